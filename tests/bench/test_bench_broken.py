"""A broken server, an unreachable one and a hanging one: every failure is counted with its
reason, and the run ends within its bounds."""
from __future__ import annotations

import asyncio
import json
import socket

from bench_fake_servers import BROKEN_MODES, run_broken_server, run_fake_server
from typer.testing import CliRunner

from ferry.bench.cli import bench_app
from ferry.bench.datasets import DatasetOptions
from ferry.bench.serving import ServeConfig, run_serve


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there any more
    return port


def test_each_kind_of_broken_response_is_a_counted_failure():
    with run_broken_server() as url:
        config = ServeConfig(base_url=url, model="m", timeout=1.0,
                             dataset=DatasetOptions(num_prompts=len(BROKEN_MODES), input_len=8,
                                                    output_len=4))
        result = asyncio.run(run_serve(config))
    s = result["summary"]
    assert s["completed"] == 0 and s["failed"] == len(BROKEN_MODES)
    kinds = {kind: entry["count"] for kind, entry in s["errors"].items()}
    # close_at_once + drop_mid_stream; html_page + not_json + no_choices; 500; never_answer.
    assert kinds == {"disconnected": 2, "invalid_response": 3, "http_500": 1, "timeout": 1}
    assert "boom" in s["errors"]["http_500"]["example"]
    assert all(r["error"] for r in result["requests"])
    assert all(r["ttft"] is None for r in result["requests"])


def test_unreachable_server_fails_every_request_quickly():
    url = f"http://127.0.0.1:{_closed_port()}"
    result = asyncio.run(run_serve(ServeConfig(
        base_url=url, timeout=5, dataset=DatasetOptions(num_prompts=3, input_len=4, output_len=2))))
    s = result["summary"]
    assert s["failed"] == 3 and list(s["errors"]) == ["connect"]
    assert "cannot connect" in s["errors"]["connect"]["example"]
    assert result["server_metrics"] is None
    assert any("did not list" in note for note in result["dataset"]["notes"])


def test_cli_reports_failures_without_crashing(tmp_path):
    out = tmp_path / "r.json"
    with run_broken_server() as url:
        res = CliRunner().invoke(bench_app, [
            "serve", "--base-url", url, "--model", "m", "--num-prompts", "7", "--input-len", "4",
            "--output-len", "2", "--timeout", "1", "--result-json", str(out), "--no-progress"])
    assert res.exit_code == 1  # no request succeeded: a failed benchmark, not a crash
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Failed requests by reason" in res.output
    assert json.loads(out.read_text())["summary"]["failed"] == 7


def test_max_duration_bounds_the_run_and_counts_the_rest_as_failed():
    with run_fake_server(first_delay=0.0, token_delay=0.2) as (url, _):
        config = ServeConfig(base_url=url, max_concurrency=1, max_duration=0.5,
                             dataset=DatasetOptions(num_prompts=6, input_len=4, output_len=10))
        result = asyncio.run(run_serve(config))
    s = result["summary"]
    assert s["completed"] == 0 and s["failed"] == 6
    assert list(s["errors"]) == ["cancelled"]
    assert "--max-duration" in s["errors"]["cancelled"]["example"]
