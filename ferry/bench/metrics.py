"""The summary of a serving run: counts, throughput, latency percentiles and goodput.

Definitions (per successful request):
- TTFT: from sending the request to the first chunk carrying generated text.
- TPOT: (E2E - TTFT) / (output tokens - 1), i.e. excluding the first token.
- ITL: every gap between two consecutive text-carrying chunks.
- E2E: from sending the request to the end of its stream.
Throughputs divide by the run's duration (first request sent to last one finished).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from ferry.bench.client import RequestResult

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """A request's result plus what was asked of it (the raw row of the JSON report)."""

    index: int
    prompt_len: int
    expected_output_len: int
    result: RequestResult
    tag: str | None = None
    scheduled_time: float = 0.0      # when the arrival process released it (s from start)

    @property
    def tpot(self) -> float | None:
        r = self.result
        if not r.success or r.output_tokens < 2 or r.ttft is None or r.latency is None:
            return None
        return (r.latency - r.ttft) / (r.output_tokens - 1)

    @property
    def input_tokens(self) -> int:
        server = self.result.server_prompt_tokens
        return server if server is not None else self.prompt_len

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {"index": self.index, "tag": self.tag, "success": r.success,
                "error_kind": r.error_kind, "error": r.error,
                "scheduled_time": self.scheduled_time, "start_time": r.start_time,
                "prompt_len": self.prompt_len, "server_prompt_tokens": r.server_prompt_tokens,
                "expected_output_len": self.expected_output_len,
                "output_tokens": r.output_tokens, "output_tokens_source": r.output_tokens_source,
                "finish_reason": r.finish_reason, "ttft": r.ttft, "tpot": self.tpot,
                "latency": r.latency, "itl": r.itl,
                **({"energy_joules": r.energy_joules} if r.energy_joules is not None else {})}


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` (milliseconds) -> ``{"ttft": 500.0, "tpot": 50.0}``."""
    slo: dict[str, float] = {}
    for item in items:
        for part in item.replace(",", " ").split():
            name, _, value = part.partition(":")
            name = name.strip().lower()
            if name not in SLO_METRICS:
                raise ValueError(f"--goodput: unknown metric {name!r} in {part!r}; use "
                                 f"{', '.join(SLO_METRICS)} as NAME:MILLISECONDS, e.g. ttft:500")
            try:
                slo[name] = float(value)
            except ValueError:
                raise ValueError(f"--goodput: {part!r} needs a number of milliseconds "
                                 f"after the colon, e.g. {name}:500") from None
            if slo[name] <= 0:
                raise ValueError(f"--goodput: {part!r} must be a positive number of ms")
    return slo


def distribution_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean/median/std/min/max and p90/p99 of seconds values, in milliseconds."""
    keys = ("mean", "median", "std", "min", "max") + tuple(f"p{p}" for p in PERCENTILES[1:])
    if not values_s:
        return {key: None for key in keys}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    stats = {"mean": ms.mean(), "median": np.median(ms), "std": ms.std(),
             "min": ms.min(), "max": ms.max()}
    stats.update({f"p{p}": np.percentile(ms, p) for p in PERCENTILES[1:]})
    return {key: float(stats[key]) for key in keys}


def summarize(records: list[RequestRecord], duration: float,
              slo: dict[str, float] | None = None, by_tag: bool = True) -> dict[str, Any]:
    """Counts, throughputs, latency distributions, goodput and errors of a finished run;
    with ``by_tag``, latency distributions per request tag too (2 to 8 tags)."""
    ok = [rec for rec in records if rec.result.success]
    duration = max(duration, 1e-9)
    input_tokens = sum(rec.input_tokens for rec in ok)
    output_tokens = sum(rec.result.output_tokens for rec in ok)
    summary: dict[str, Any] = {
        "num_requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "duration_s": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "max_concurrent_requests": peak_concurrency(ok),
        "requests_with_fewer_output_tokens": sum(
            rec.result.output_tokens < rec.expected_output_len for rec in ok),
    }
    summary.update(latency_distributions(ok))
    energies = [rec.result.energy_joules for rec in ok if rec.result.energy_joules is not None]
    if energies:   # absent, not 0, where the server reports no energy
        summary["energy_joules"] = sum(energies)
        summary["output_tokens_per_joule"] = (output_tokens / sum(energies)
                                              if sum(energies) > 0 else None)
    summary["goodput"] = goodput(ok, slo, duration) if slo else None
    summary["errors"] = error_counts(records)
    tags = sorted({rec.tag for rec in records if rec.tag is not None})
    if by_tag and 1 < len(tags) <= 8:
        summary["by_tag"] = {tag: {"completed": sum(rec.tag == tag for rec in ok),
                                   **latency_distributions([r for r in ok if r.tag == tag])}
                             for tag in tags}
    return summary


def latency_distributions(ok: list[RequestRecord]) -> dict[str, Any]:
    return {
        "ttft_ms": distribution_ms([rec.result.ttft for rec in ok]),
        "tpot_ms": distribution_ms([rec.tpot for rec in ok if rec.tpot is not None]),
        "itl_ms": distribution_ms([gap for rec in ok for gap in rec.result.itl]),
        "e2el_ms": distribution_ms([rec.result.latency for rec in ok]),
    }


def goodput(ok: list[RequestRecord], slo: dict[str, float], duration: float) -> dict[str, Any]:
    """Requests per second that met every service-level objective in ``slo`` (ms)."""
    def meets(rec: RequestRecord) -> bool:
        values = {"ttft": rec.result.ttft, "tpot": rec.tpot, "e2el": rec.result.latency}
        return all(values[name] is None or values[name] * 1000.0 <= limit
                   for name, limit in slo.items())

    good = sum(meets(rec) for rec in ok)
    return {"slo_ms": slo, "good_requests": good, "request_goodput": good / duration}


def error_counts(records: list[RequestRecord]) -> dict[str, dict[str, Any]]:
    """``{error_kind: {"count": n, "example": first message}}`` of the failed requests."""
    errors: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec.result.success:
            continue
        kind = rec.result.error_kind or "error"
        entry = errors.setdefault(kind, {"count": 0, "example": rec.result.error})
        entry["count"] += 1
    return errors


def peak_concurrency(ok: list[RequestRecord]) -> int:
    """Most requests in flight at once (from start times and latencies)."""
    events = []
    for rec in ok:
        start = rec.result.start_time
        events += [(start, 1), (start + (rec.result.latency or 0.0), -1)]
    peak = current = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        current += step
        peak = max(peak, current)
    return peak
