"""benchmarks/soak.py's request loop for ~6 s against a real ``ferry serve`` of the demo model:
mixed chat / completions, streaming or not, disconnects and bad requests; no 5xx, every bad
request a 4xx, every completed answer correct, and no KV block left in use once idle."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests" / "server"))

import soak  # noqa: E402
from ferry_server_process import ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def demo_server():
    proc = ServerProcess(["--kv-cache-memory", "64MiB"])  # no --model: the demo model
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_soak_loop_no_5xx_and_correct(demo_server):
    ticks: list[float] = []
    stats = asyncio.run(soak.run_load(demo_server.url, 6.0, seed=1, phase_s=2.0,
                                      bad_every_s=0.5, on_tick=ticks.append, tick_s=2.0))
    summary = stats.summary()
    assert summary["server_errors_5xx"] == 0, summary
    assert summary["unexpected_count"] == 0, summary["unexpected"]
    assert summary["completed_checked"] > 10, summary
    assert summary["wrong_count"] == 0, summary["wrong"]
    assert set(summary["bad_requests"]) == set(soak.BAD_REQUEST_KINDS), summary["bad_requests"]
    for kind, codes in summary["bad_requests"].items():
        assert all(code.isdigit() and 400 <= int(code) < 500 for code in codes), (kind, codes)
    assert summary["bad_requests"]["oversized_body"].keys() == {"413"}
    kinds = {k.split("+")[0] for k in summary["requests_by_kind"]}
    assert kinds == {"chat/plain", "chat/stream", "completions/plain", "completions/stream"}
    assert len(ticks) >= 3
    idle = soak.wait_idle(demo_server.url, timeout=20)
    assert idle["llm_kv_cache_usage_ratio"] == 0, idle
    assert idle["llm_requests_running"] == 0 and idle["llm_requests_waiting"] == 0, idle


def test_rss_growth_windows():
    samples = [{"t_s": float(t), "rss_mib": 100.0 + (5.0 if t >= 480 else 0.0)}
               for t in range(0, 601, 10)]
    growth = soak.rss_growth(samples, 600)
    assert growth["warmup_s"] == 240 and growth["window_s"] == 120
    assert growth["first_window_median_mib"] == 100.0
    assert growth["last_window_median_mib"] == 105.0
    assert growth["growth"] == 0.05
