"""``ferry bench sweep``: the same workload at several concurrencies or request rates.

The result is the throughput / tail-latency curve engines are compared by. Each point is
a full ``run_serve``; the sweep JSON keeps every point's summary (and, with a result
directory, every point's full per-request JSON).
"""
from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ferry.bench.report import write_json
from ferry.bench.serving import RESULT_VERSION, ServeConfig, run_serve

SWEEP_MODES = ("concurrency", "rate")


def parse_loads(text: str, mode: str) -> list[float | int]:
    """'1,2,4' -> [1, 2, 4] (concurrency: integers >= 1; rate: numbers > 0 or inf)."""
    if mode not in SWEEP_MODES:
        raise ValueError(f"unknown sweep mode {mode!r}; use one of {', '.join(SWEEP_MODES)}")
    loads: list[float | int] = []
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"cannot read {part!r} as a {mode} (example: 1,2,4,8)") from None
        if mode == "concurrency":
            if value < 1 or value != int(value):
                raise ValueError(f"concurrencies must be integers >= 1, got {part!r}")
            value = int(value)
        elif not value > 0:
            raise ValueError(f"request rates must be > 0 (or inf), got {part!r}")
        loads.append(value)
    if not loads:
        raise ValueError(f"give at least one {mode} to sweep, e.g. 1,2,4")
    return loads


async def run_sweep(base: ServeConfig, mode: str, loads: list[float | int],
                    result_dir: str | Path | None = None,
                    on_point: Callable[[dict[str, Any]], None] | None = None,
                    progress_factory: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run ``base`` once per load; warmup requests are sent before the first point only.

    Point ``i`` uses the dataset seed ``seed + i``: fresh prompts of the same shape, so a
    prefix cache warmed by one point does not flatter the next.
    """
    points = []
    for i, load in enumerate(loads):
        changes: dict[str, Any] = {
            "warmup": base.warmup if i == 0 else 0,
            "dataset": dataclasses.replace(base.dataset, seed=base.dataset.seed + i)}
        if mode == "concurrency":
            changes["max_concurrency"] = int(load)
        else:
            changes["request_rate"] = float(load)
        config = dataclasses.replace(base, **changes)
        hook = progress_factory(f"{mode} {load}") if progress_factory else None
        result = await run_serve(config, hook)
        point = {"load": _load_json(load), "summary": result["summary"],
                 "server_metrics": result["server_metrics"]}
        if result_dir is not None:
            path = Path(result_dir) / f"{mode}_{load}.json"
            write_json(result, path)
            point["result_file"] = str(path)
        points.append(point)
        if on_point:
            on_point(result)
    label = result["label"] if points else (base.label or base.model)
    return {"version": RESULT_VERSION, "kind": "sweep", "mode": mode, "label": label,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": {"base_url": base.base_url, "endpoint": base.endpoint,
                       "model": base.model, "dataset": base.dataset.__dict__,
                       "loads": [_load_json(x) for x in loads]},
            "points": points}


def _load_json(load: float | int) -> float | int | str:
    return "inf" if isinstance(load, float) and math.isinf(load) else load
