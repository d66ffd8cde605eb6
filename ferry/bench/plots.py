"""Plots of ``ferry bench`` results (matplotlib, no pyplot state: safe in any thread).

- ``plot_serve``: latency CDFs, output throughput and requests in flight over time.
- ``plot_curves``: output throughput against p99 latency, one curve per engine/sweep.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CURVE_METRICS = (("ttft_ms", "p99 TTFT (ms)"), ("tpot_ms", "p99 TPOT (ms)"),
                 ("e2el_ms", "p99 E2E latency (ms)"))


def _save(fig: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _cdf(ax, values_ms: list[float], label: str) -> None:
    if not values_ms:
        return
    xs = np.sort(np.asarray(values_ms))
    ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)


def token_timeline(requests: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(time of each text chunk in s from the start, tokens it carried) of the good requests."""
    times, weights = [], []
    for req in requests:
        if not req["success"] or req["ttft"] is None:
            continue
        chunk_times = req["start_time"] + req["ttft"] + np.concatenate(
            [[0.0], np.cumsum(req["itl"])])
        times.append(chunk_times)
        weights.append(np.full(len(chunk_times), req["output_tokens"] / len(chunk_times)))
    if not times:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(times), np.concatenate(weights)


def plot_serve(result: dict[str, Any], path: str | Path) -> None:
    """Four panels: TTFT/E2E CDFs, TPOT/ITL CDFs, output tok/s and requests in flight."""
    requests = [r for r in result["requests"] if r["success"]]
    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2)
    ms = lambda key: [r[key] * 1000 for r in requests if r[key] is not None]  # noqa: E731
    _cdf(axes[0, 0], ms("ttft"), "TTFT")
    _cdf(axes[0, 0], ms("latency"), "E2E latency")
    _cdf(axes[0, 1], ms("tpot"), "TPOT")
    _cdf(axes[0, 1], [g * 1000 for r in requests for g in r["itl"]], "ITL")
    for ax in axes[0]:
        ax.set_xlabel("milliseconds")
        ax.set_ylabel("fraction of requests (ITL: of gaps)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0, 0].set_title("Latency CDF")
    axes[0, 1].set_title("Per-token latency CDF")
    duration = max(result["summary"]["duration_s"], 1e-3)
    _throughput_panel(axes[1, 0], requests, duration)
    _in_flight_panel(axes[1, 1], requests, duration)
    cfg = result["config"]
    fig.suptitle(f"{result['label']}: {result['dataset']['name']} dataset, "
                 f"rate {cfg['request_rate']}, concurrency {cfg['max_concurrency'] or 'unbounded'}")
    fig.tight_layout()
    _save(fig, path)


def _throughput_panel(ax, requests: list[dict[str, Any]], duration: float) -> None:
    times, weights = token_timeline(requests)
    width = 1.0 if duration >= 10 else duration / 10
    edges = np.arange(0.0, duration + width, width)
    counts, _ = np.histogram(times, bins=edges, weights=weights)
    ax.step(edges[:-1], counts / width, where="post")
    ax.set_ylim(bottom=0)
    ax.set_title("Output throughput over time")
    ax.set_xlabel("seconds since the start")
    ax.set_ylabel("output tokens / s")
    ax.grid(alpha=0.3)


def _in_flight_panel(ax, requests: list[dict[str, Any]], duration: float) -> None:
    grid = np.linspace(0.0, duration, 200)
    starts = np.array([r["start_time"] for r in requests])
    ends = starts + np.array([r["latency"] for r in requests])
    in_flight = [(np.sum((starts <= t) & (ends > t))) for t in grid]
    ax.plot(grid, in_flight)
    ax.set_ylim(bottom=0)
    ax.set_title("Requests in flight")
    ax.set_xlabel("seconds since the start")
    ax.set_ylabel("requests")
    ax.grid(alpha=0.3)


def curve_points(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The (load, summary) points of a sweep, or the single point of a serve result."""
    if result["kind"] == "sweep":
        return result["points"]
    cfg = result["config"]
    return [{"load": cfg["max_concurrency"] or cfg["request_rate"], "summary": result["summary"]}]


def plot_curves(results: list[dict[str, Any]], labels: list[str], path: str | Path) -> None:
    """Output throughput (x) against p99 TTFT, TPOT and E2E (y), one line per result."""
    fig = Figure(figsize=(15, 4.5))
    axes = fig.subplots(1, len(CURVE_METRICS))
    for result, label in zip(results, labels):
        points = curve_points(result)
        xs = [p["summary"]["output_throughput"] for p in points]
        for ax, (key, _) in zip(axes, CURVE_METRICS):
            ys = [p["summary"][key]["p99"] for p in points]
            ax.plot(xs, ys, marker="o", label=label)
            for x, y, p in zip(xs, ys, points):
                if y is not None:
                    ax.annotate(str(p["load"]), (x, y), textcoords="offset points",
                                xytext=(4, 4), fontsize=8)
    for ax, (_, title) in zip(axes, CURVE_METRICS):
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs throughput")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Throughput vs tail latency (labels: concurrency or request rate)")
    fig.tight_layout()
    _save(fig, path)
