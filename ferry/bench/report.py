"""Terminal tables and JSON files for ``ferry bench`` results."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

LATENCY_ROWS = (("TTFT", "ttft_ms"), ("TPOT (excl. 1st token)", "tpot_ms"),
                ("ITL", "itl_ms"), ("E2E latency", "e2el_ms"))
LATENCY_COLS = ("mean", "median", "p90", "p99")


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def print_serve_report(result: dict[str, Any], console: Console | None = None) -> None:
    """The summary, latency, error and server-metric tables of one serve run."""
    console = console or Console()
    s, cfg = result["summary"], result["config"]
    title = (f"ferry bench serve: {result['label']} @ {cfg['url']} "
             f"(rate {cfg['request_rate']}, concurrency {cfg['max_concurrency'] or 'unbounded'})")
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Duration (s)", s["duration_s"]), ("Total input tokens", s["total_input_tokens"]),
            ("Total output tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", s["request_throughput"]),
            ("Output token throughput (tok/s)", s["output_throughput"]),
            ("Total token throughput (tok/s)", s["total_token_throughput"]),
            ("Peak concurrent requests", s["max_concurrent_requests"])]
    if s.get("goodput"):
        g = s["goodput"]
        slo = " ".join(f"{k}:{v:g}" for k, v in g["slo_ms"].items())
        rows.append((f"Goodput (req/s, {slo} ms)", g["request_goodput"]))
    for name, value in rows:
        table.add_row(name, fmt(value))
    console.print(table)
    console.print(latency_table(s, "Latency (ms)"))
    for tag, part in (s.get("by_tag") or {}).items():
        console.print(latency_table(part, f"Latency (ms) of '{tag}' requests "
                                          f"({part['completed']} completed)"))
    _print_errors(s, console)
    _print_server_metrics(result.get("server_metrics"), console)
    for note in result["dataset"]["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    rejected = [k for k in s["errors"] if k in ("http_400", "http_422")]
    if rejected and s["completed"] == 0:
        hint = rejection_hint(s["errors"][rejected[0]]["example"])
        console.print(f"[yellow]hint:[/yellow] {escape(hint)}")   # the server's text, verbatim
    if s["requests_with_fewer_output_tokens"]:
        console.print(f"[yellow]note:[/yellow] {s['requests_with_fewer_output_tokens']} requests "
                      "got fewer output tokens than asked (the server stopped early: EOS or "
                      "context limit; ignore_eos may be unsupported)")


# Words in a server's error that say the request was longer than its context.
_CONTEXT_WORDS = ("context length", "context_length", "max_model_len", "maximum context")


def rejection_hint(message: str | None) -> str:
    """Why a server may have rejected every request, from its own error text: too long
    for its context, or else a field it does not accept."""
    said = f"the server rejected every request: {message}" if message else \
        "the server rejected every request body"
    if message and any(word in message.lower() for word in _CONTEXT_WORDS):
        return (f"{said}; the prompts plus the outputs are longer than its context: lower "
                "--input-len / --output-len")
    return (f"{said}; it may not accept 'ignore_eos' (try --no-ignore-eos) or "
            "'stream_options' (try --extra-body '{\"stream_options\": null}'), or --model "
            "is wrong")


def latency_table(part: dict[str, Any], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for col in LATENCY_COLS:
        table.add_column(col, justify="right")
    for name, key in LATENCY_ROWS:
        table.add_row(name, *(fmt(part[key][col]) for col in LATENCY_COLS))
    return table


def _print_errors(summary: dict[str, Any], console: Console) -> None:
    if not summary["errors"]:
        return
    table = Table(title="Failed requests by reason", title_justify="left")
    for col in ("reason", "count", "example"):
        table.add_column(col)
    for kind, entry in summary["errors"].items():
        table.add_row(kind, str(entry["count"]), entry["example"] or "")
    console.print(table)


def _print_server_metrics(metrics: dict[str, Any] | None, console: Console) -> None:
    if not metrics:
        return
    names = {"prefix_cache_hit_ratio_before": "Prefix-cache hit ratio before",
             "prefix_cache_hit_ratio_after": "Prefix-cache hit ratio after",
             "prefix_cache_hit_ratio_change": "Prefix-cache hit ratio change",
             "prefix_cache_hit_ratio_during_run": "Prefix-cache hit ratio during the run",
             "prefix_cache_hit_ratio_during_run_est":
                 "Prefix-cache hit ratio during the run (est. from prompt tokens)",
             "llm_prompt_tokens_delta": "Prompt tokens the server counted",
             "llm_generation_tokens_delta": "Generated tokens the server counted",
             "llm_preemptions_delta": "Preemptions during the run",
             "llm_kv_cache_page_faults_delta": "KV page faults during the run",
             "energy_joules": "Energy (J)", "output_tokens_per_joule": "Output tokens per joule"}
    table = Table(title="Server metrics (from /metrics)", show_header=False, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, name in names.items():
        if key not in metrics:
            continue
        value = metrics[key]
        if key.endswith("_delta"):   # counts
            table.add_row(name, fmt(int(round(value))))
        else:
            table.add_row(name, fmt(value, 4 if key.startswith("prefix_cache") else 2))
    if table.row_count:
        console.print(table)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return str(value)


def load_result(path: str | Path) -> dict[str, Any]:
    """Read a serve or sweep JSON written by ``ferry bench``; ``ValueError`` if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"result file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("kind") not in ("serve", "sweep"):
        raise ValueError(f"{path} is not a ferry bench result (written by `ferry bench serve "
                         "--result-json` or `ferry bench sweep --result-json`)")
    return data


def si(value: float | None, unit: str) -> str:
    """3 significant digits with an SI prefix: si(6.1e9, 'B/s') -> '6.10 GB/s'."""
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def limit_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Readable rows comparing an offline result with the device's physical limits."""
    lim = result["limits"]
    peak = lim["peak_bf16_tflops"]
    rows = [("Device", f"{lim['device']} ({lim['device_kind']})"),
            ("Copy bandwidth (measured)", f"{si(lim['copy_bandwidth_gb_s'] * 1e9, 'B/s')} "
                                          f"[{lim['bandwidth_note']}]"),
            ("Peak bf16 compute", f"{peak:g} TFLOP/s (datasheet)" if peak else "unknown"),
            ("Weights / read per decode step", f"{si(lim['weight_bytes'], 'B')} / "
                                               f"{si(lim['decode_weight_bytes'], 'B')}"),
            ("KV cache per token", si(lim["kv_bytes_per_token"], "B"))]
    if result["kind"] == "throughput":
        rows += [(f"Decode ceiling at batch {lim['assumed_decode_batch']} (bandwidth)",
                  f"{si(lim['decode_bound_output_tok_s'], 'tok/s')} vs measured "
                  f"{si(result['output_throughput'], 'tok/s')}"),
                 ("Run time lower bound vs measured",
                  f"{lim['time_lower_bound_s']:.3g} s vs {result['elapsed_s']:.3g} s"),
                 ("Share of the speed of light", _pct(lim["speed_of_light_ratio"]))]
        return rows
    median_step = result["decode_step_ms"]["median"]
    rows += [("Decode step: bytes moved", si(lim["decode_step_bytes"], "B")),
             ("Decode step: lower bound vs median",
              f"{lim['decode_step_lower_bound_ms']:.3g} ms vs "
              + (f"{median_step:.3g} ms" if median_step else "-")),
             ("Decode: bandwidth utilization", _pct(lim.get("decode_bandwidth_utilization"))),
             ("Prefill: FLOPs / achieved", f"{si(lim['prefill_flops'], 'FLOP')} / "
              f"{si((lim.get('prefill_achieved_tflops') or 0) * 1e12, 'FLOP/s')}")]
    if "prefill_mfu" in lim:
        rows.append(("Prefill: model FLOPs utilization", _pct(lim["prefill_mfu"])))
    return rows
