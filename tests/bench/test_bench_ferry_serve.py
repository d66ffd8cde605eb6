"""`ferry bench serve` against a real `ferry serve` subprocess on a tiny random model.

The benchmark's own counts are checked against what was asked and against the server's
Prometheus counters (an independent count of the same tokens).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from ferry.bench.cli import bench_app

pytestmark = pytest.mark.slow   # starts a server: ~20 s on 2 CPU cores

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ferry_server(tiny_model_dir, tmp_path_factory):
    """``(base_url, model_dir)`` of a `ferry serve` subprocess on a tiny llama."""
    model_dir = tiny_model_dir("llama")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ferry", "serve", "--model", str(model_dir),
             "--host", "127.0.0.1", "--port", str(port), "--kv-cache-memory", "64MiB",
             "--device", "cpu"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log_path)
        yield url, model_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ferry serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"ferry serve did not become healthy:\n{log_path.read_text()[-3000:]}")


def _bench(tmp_path: Path, url: str, *args: str) -> dict:
    out = tmp_path / "result.json"
    res = CliRunner().invoke(bench_app, ["serve", "--base-url", url, "--result-json", str(out),
                                         "--no-progress", "--timeout", "120", *args])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def test_completions_run_is_complete_and_consistent(ferry_server, tmp_path):
    url, _ = ferry_server
    data = _bench(tmp_path, url, "--num-prompts", "8", "--input-len", "24", "--output-len", "12",
                  "--max-concurrency", "4", "--warmup", "1", "--goodput", "ttft:600000")
    s = data["summary"]
    assert (s["num_requests"], s["completed"], s["failed"]) == (8, 8, 0)
    assert s["goodput"]["good_requests"] == 8
    assert data["dataset"]["token_exact"]   # the server reports its model dir: a local tokenizer
    for req in data["requests"]:
        assert req["success"] and req["error"] is None
        assert 0 < req["ttft"] <= req["latency"]
        assert req["prompt_len"] == req["server_prompt_tokens"] == 24
        assert req["output_tokens"] == req["expected_output_len"] == 12
        assert req["output_tokens_source"] == "usage"
        assert req["finish_reason"] == "length"
    assert s["total_input_tokens"] == 8 * 24 and s["total_output_tokens"] == 8 * 12
    assert s["max_concurrent_requests"] <= 4
    # The server counted the same tokens during the run (warmup came before the first scrape).
    metrics = data["server_metrics"]
    assert metrics["llm_prompt_tokens_delta"] == 8 * 24
    assert metrics["llm_generation_tokens_delta"] == 8 * 12


def test_chat_prefix_workload_raises_the_prefix_cache_hit_ratio(ferry_server, tmp_path):
    url, _ = ferry_server
    data = _bench(tmp_path, url, "--endpoint", "chat", "--dataset", "prefix",
                  "--num-prefixes", "2", "--prefix-len", "48", "--input-len", "8",
                  "--num-prompts", "6", "--output-len", "4", "--max-concurrency", "1")
    s = data["summary"]
    assert s["completed"] == 6 and s["failed"] == 0
    assert all(r["output_tokens"] == 4 for r in data["requests"])
    # Chat adds the template's tokens to each prompt, never removes any.
    assert all(r["server_prompt_tokens"] > r["prompt_len"] for r in data["requests"])
    metrics = data["server_metrics"]
    assert metrics["prefix_cache_hit_ratio_after"] > metrics["prefix_cache_hit_ratio_before"]
    # 4 of the 6 prompts find the 3 blocks of their group's prefix cached: about half the
    # prompt tokens of the run.
    assert 0.3 < metrics["prefix_cache_hit_ratio_during_run_est"] < 0.8
