"""``ferry bench compare``: several result files side by side, with ratios to the first.

Serve results are compared as they are; sweep results are compared point by point at
each load (concurrency or rate) that the first file has.
"""
from __future__ import annotations

from typing import Any

from rich.table import Table

from ferry.bench.plots import curve_points
from ferry.bench.report import fmt

# (row name, path into a summary, higher is better)
COMPARE_ROWS = (
    ("Completed requests", ("completed",), True),
    ("Failed requests", ("failed",), False),
    ("Request throughput (req/s)", ("request_throughput",), True),
    ("Output throughput (tok/s)", ("output_throughput",), True),
    ("Total token throughput (tok/s)", ("total_token_throughput",), True),
    ("Mean TTFT (ms)", ("ttft_ms", "mean"), False),
    ("Median TTFT (ms)", ("ttft_ms", "median"), False),
    ("P99 TTFT (ms)", ("ttft_ms", "p99"), False),
    ("Mean TPOT (ms)", ("tpot_ms", "mean"), False),
    ("P99 TPOT (ms)", ("tpot_ms", "p99"), False),
    ("Mean ITL (ms)", ("itl_ms", "mean"), False),
    ("P99 ITL (ms)", ("itl_ms", "p99"), False),
    ("Mean E2E (ms)", ("e2el_ms", "mean"), False),
    ("P99 E2E (ms)", ("e2el_ms", "p99"), False),
    ("Goodput (req/s)", ("goodput", "request_goodput"), True),
)


def _get(summary: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = summary
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def ratio(value: Any, base: Any) -> str:
    """'1.25x' for value/base, '-' when either is missing or the base is 0."""
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)) or not base:
        return "-"
    return f"{value / base:.2f}x"


def compare_tables(results: list[dict[str, Any]], labels: list[str]) -> list[Table]:
    """One table per compared load: a column per result and a ratio column per non-first one."""
    if len(results) < 2:
        raise ValueError("compare needs at least two result files")
    if len(labels) != len(results):
        raise ValueError(f"--labels has {len(labels)} names for {len(results)} files")
    if all(r["kind"] == "serve" for r in results):
        return [_table("Comparison", [r["summary"] for r in results], labels)]
    tables = []
    for point in curve_points(results[0]):
        summaries = [point["summary"]]
        names = [labels[0]]
        for result, label in zip(results[1:], labels[1:]):
            match = next((p for p in curve_points(result) if p["load"] == point["load"]), None)
            if match is not None:
                summaries.append(match["summary"])
                names.append(label)
        if len(summaries) > 1:
            tables.append(_table(f"Comparison at load {point['load']}", summaries, names))
    if not tables:
        raise ValueError("the sweeps share no load (concurrency or rate) to compare at")
    return tables


def _table(title: str, summaries: list[dict[str, Any]], labels: list[str]) -> Table:
    table = Table(title=title + " (ratios: other / first; lower is better for latencies)",
                  title_justify="left")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    for label in labels[1:]:
        table.add_column(f"{label} / {labels[0]}", justify="right")
    for name, path, _ in COMPARE_ROWS:
        values = [_get(s, path) for s in summaries]
        if all(v is None for v in values):
            continue
        table.add_row(name, *(fmt(v) for v in values), *(ratio(v, values[0]) for v in values[1:]))
    return table


def default_labels(results: list[dict[str, Any]], paths: list[str]) -> list[str]:
    """Each result's label, made unique with its file name when two are the same."""
    labels = [str(r.get("label") or p) for r, p in zip(results, paths)]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({p})" for label, p in zip(labels, paths)]
    return labels
