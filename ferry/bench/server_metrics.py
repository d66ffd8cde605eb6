"""Read a server's Prometheus ``/metrics`` before and after a run, and report the change.

Only ferry's metric names are understood (DESIGN.md: ``llm_kv_cache_hit_ratio``,
``llm_energy_joules_total``, ...); a server without them, or without ``/metrics`` at all,
simply yields no server metrics.
"""
from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

# Counters whose growth over the run is reported as is.
_COUNTERS = ("llm_prompt_tokens_total", "llm_generation_tokens_total",
             "llm_preemptions_total", "llm_kv_cache_page_faults_total",
             "llm_energy_joules_total", "llm_prefix_cache_queries_total",
             "llm_prefix_cache_hits_total")
_GAUGES = ("llm_kv_cache_hit_ratio", "llm_kv_cache_usage_ratio", "llm_gpu_memory_used_bytes")


async def scrape(client: httpx.AsyncClient, base_url: str, model: str,
                 timeout: float = 5.0) -> dict[str, float] | None:
    """Ferry's metrics as ``{name: value}`` (summed over series of ``model``), or None."""
    try:
        resp = await client.get(f"{base_url}/metrics", timeout=timeout)
        if resp.status_code != 200:
            return None
        return parse_metrics(resp.text, model)
    except (httpx.HTTPError, ValueError, OSError):
        return None


def parse_metrics(text: str, model: str | None = None) -> dict[str, float] | None:
    """Values of the known ferry metrics in a Prometheus text page (None if none is there).

    Series labelled with another ``model`` are ignored; gauges with several series are
    averaged, counters are summed.
    """
    wanted = set(_COUNTERS) | set(_GAUGES)
    sums: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in wanted:
                continue
            if model and sample.labels.get("model", model) != model:
                continue
            sums.setdefault(sample.name, []).append(float(sample.value))
    if not sums:
        return None
    return {name: (sum(vals) if name in _COUNTERS else sum(vals) / len(vals))
            for name, vals in sums.items()}


def metrics_delta(before: dict[str, float] | None, after: dict[str, float] | None,
                  output_tokens: int) -> dict[str, Any] | None:
    """The run's effect on the server: counter growth, hit ratio before/after, energy."""
    if not before or not after:
        return None
    report: dict[str, Any] = {"before": before, "after": after}
    for name in _COUNTERS:
        if name in before and name in after:
            report[name.removesuffix("_total") + "_delta"] = after[name] - before[name]
    if "llm_kv_cache_hit_ratio" in before and "llm_kv_cache_hit_ratio" in after:
        report["prefix_cache_hit_ratio_before"] = before["llm_kv_cache_hit_ratio"]
        report["prefix_cache_hit_ratio_after"] = after["llm_kv_cache_hit_ratio"]
        report["prefix_cache_hit_ratio_change"] = (after["llm_kv_cache_hit_ratio"]
                                                   - before["llm_kv_cache_hit_ratio"])
    queries = report.get("llm_prefix_cache_queries_delta")
    if queries:
        report["prefix_cache_hit_ratio_during_run"] = (
            report.get("llm_prefix_cache_hits_delta", 0.0) / queries)
    elif "prefix_cache_hit_ratio_after" in report:
        estimate = _run_hit_ratio_estimate(before, after)
        if estimate is not None:
            report["prefix_cache_hit_ratio_during_run_est"] = estimate
    energy = report.get("llm_energy_joules_delta")
    if energy:
        report["energy_joules"] = energy
        report["output_tokens_per_joule"] = output_tokens / energy
    return report


def _run_hit_ratio_estimate(before: dict[str, float], after: dict[str, float]) -> float | None:
    """The run's own hit ratio from the since-start gauge, weighting it by prompt tokens.

    ``llm_kv_cache_hit_ratio`` = hits / looked-up tokens since the server started, so a run
    after others is diluted by their lookups. Looked-up tokens are about the prompt tokens
    (``llm_prompt_tokens_total``), hence hits ~ ratio * prompt tokens before and after.
    """
    key = "llm_prompt_tokens_total"
    if key not in before or key not in after or after[key] <= before[key]:
        return None
    hits_after = after["llm_kv_cache_hit_ratio"] * after[key]
    hits_before = before["llm_kv_cache_hit_ratio"] * before[key]
    return min(max((hits_after - hits_before) / (after[key] - before[key]), 0.0), 1.0)
