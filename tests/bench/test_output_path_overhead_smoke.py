"""benchmarks/output_path_overhead.py runs on a short generation: one timing per step,
and the medians it prints add up."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import output_path_overhead as bench  # noqa: E402


def test_measures_every_step_of_every_stream():
    steps = bench.measure(bench.build_tokenizer(), streams=2, length=80)
    assert len(steps) == 80 and all(engine > 0 and server >= 0 for engine, server in steps)
    row = bench.at(steps, 64)
    assert row["total_us"] == row["engine_us"] + row["server_us"] > 0
