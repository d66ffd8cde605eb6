"""`ferry bench serve` against a local fake OpenAI-compatible server (streams one word per
token with known delays and counts its own concurrent streams)."""
from __future__ import annotations

import asyncio
import json

import pytest
from bench_fake_servers import run_fake_server
from typer.testing import CliRunner

from ferry.bench.cli import bench_app
from ferry.bench.datasets import DatasetOptions
from ferry.bench.serving import ServeConfig, run_serve

REQUEST_FIELDS = {"index", "tag", "success", "error_kind", "error", "scheduled_time",
                  "start_time", "prompt_len", "server_prompt_tokens", "expected_output_len",
                  "output_tokens", "output_tokens_source", "finish_reason", "ttft", "tpot",
                  "latency", "itl"}
SUMMARY_FIELDS = {"num_requests", "completed", "failed", "duration_s", "total_input_tokens",
                  "total_output_tokens", "request_throughput", "output_throughput",
                  "total_token_throughput", "max_concurrent_requests", "ttft_ms", "tpot_ms",
                  "itl_ms", "e2el_ms", "goodput", "errors"}
STATS = {"mean", "median", "std", "min", "max", "p90", "p99"}


def _run(url: str, **kwargs) -> dict:
    dataset = kwargs.pop("dataset", DatasetOptions(num_prompts=6, input_len=12, output_len=5))
    return asyncio.run(run_serve(ServeConfig(base_url=url, dataset=dataset, **kwargs)))


def _check_consistent(result: dict, num: int) -> None:
    s = result["summary"]
    assert SUMMARY_FIELDS <= set(s)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(s[key]) == STATS
    assert len(result["requests"]) == s["num_requests"] == num
    assert s["completed"] + s["failed"] == num
    ok = [r for r in result["requests"] if r["success"]]
    assert s["total_output_tokens"] == sum(r["output_tokens"] for r in ok)
    for req in result["requests"]:
        assert set(req) == REQUEST_FIELDS
    for req in ok:
        assert 0 < req["ttft"] <= req["latency"]
        assert req["start_time"] + req["latency"] <= s["duration_s"] + 1e-6
        assert req["start_time"] >= req["scheduled_time"] - 1e-6


@pytest.mark.parametrize("endpoint", ["/v1/completions", "chat"])
def test_every_request_is_timed_and_counted(endpoint):
    with run_fake_server(first_delay=0.03, token_delay=0.002) as (url, fake):
        result = _run(url, endpoint=endpoint)
    _check_consistent(result, 6)
    s = result["summary"]
    assert s["completed"] == 6 and s["failed"] == 0 and s["errors"] == {}
    for req in result["requests"]:
        # The fake sends one chunk per token after sleeping first_delay: a causal lower bound.
        assert req["ttft"] >= 0.03
        assert req["output_tokens"] == req["expected_output_len"] == 5
        assert req["output_tokens_source"] == "usage"
        assert len(req["itl"]) == 4
        assert req["tpot"] == pytest.approx((req["latency"] - req["ttft"]) / 4)
        assert req["finish_reason"] == "length"
    assert s["total_output_tokens"] == 30
    assert [b["max_tokens"] for b in fake.requests] == [5] * 6
    assert all(b["stream"] and b["ignore_eos"] for b in fake.requests)
    assert ("messages" in fake.requests[0]) == (endpoint == "chat")
    # Prompt tokens as the fake counted them (one per word) match what was asked.
    assert all(r["server_prompt_tokens"] == r["prompt_len"] == 12 for r in result["requests"])


def test_max_concurrency_is_respected_on_the_server_side():
    with run_fake_server(first_delay=0.02, token_delay=0.005) as (url, fake):
        result = _run(url, max_concurrency=2,
                      dataset=DatasetOptions(num_prompts=8, input_len=8, output_len=4))
    assert result["summary"]["completed"] == 8
    assert 1 <= fake.max_in_flight <= 2
    assert result["summary"]["max_concurrent_requests"] <= 2


def test_warmup_requests_are_sent_but_not_measured():
    with run_fake_server() as (url, fake):
        result = _run(url, warmup=3)
    assert len(fake.requests) == 9
    assert result["summary"]["num_requests"] == 6


def test_token_counts_without_usage_fall_back_to_chunks():
    with run_fake_server(usage=False) as (url, _):
        result = _run(url)
    assert all(r["output_tokens"] == 5 and r["output_tokens_source"] == "chunks"
               for r in result["requests"])
    assert result["requests"][0]["server_prompt_tokens"] is None


def test_tokens_without_text_are_timed_by_their_chunks_when_usage_counts_them():
    with run_fake_server(first_delay=0.03, empty_text=True) as (url, _):
        result = _run(url)
    assert result["summary"]["completed"] == 6
    for req in result["requests"]:
        assert req["output_tokens"] == 5 and req["ttft"] >= 0.03 and len(req["itl"]) == 4
    with run_fake_server(empty_text=True, usage=False) as (url, _):
        result = _run(url)
    assert list(result["summary"]["errors"]) == ["no_tokens"]


def test_extra_body_adds_keys_and_null_removes_defaults():
    with run_fake_server() as (url, fake):
        result = _run(url, extra_body={"stream_options": None, "top_k": 1}, ignore_eos=False)
    assert all("stream_options" not in b and "ignore_eos" not in b and b["top_k"] == 1
               for b in fake.requests)
    # Without usage in the stream the tokens are counted by chunks (one word each here).
    assert all(r["output_tokens"] == 5 and r["output_tokens_source"] == "chunks"
               for r in result["requests"])


def test_without_a_tokenizer_prompt_lengths_come_from_the_servers_tokenize():
    with run_fake_server(tokenize=True) as (url, fake):
        result = _run(url)
    assert result["dataset"]["token_exact"] is True
    assert "/tokenize" in result["dataset"]["notes"][0]
    # 12 tokens as the server counts them: 11 words plus its BOS.
    assert all(len(b["prompt"].split()) == 11 for b in fake.requests)
    assert all(r["server_prompt_tokens"] == r["prompt_len"] == 12 for r in result["requests"])


def test_server_metrics_change_is_reported():
    with run_fake_server() as (url, _):
        result = _run(url)
    metrics = result["server_metrics"]
    # The fake adds 1.5 J per request and counts half of each prompt's words as cache hits.
    assert metrics["energy_joules"] == pytest.approx(6 * 1.5)
    assert metrics["output_tokens_per_joule"] == pytest.approx(30 / 9)
    assert metrics["prefix_cache_hit_ratio_before"] == 0
    assert metrics["prefix_cache_hit_ratio_after"] == pytest.approx(6 / 12)


def test_cli_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    with run_fake_server() as (url, _):
        res = CliRunner().invoke(bench_app, [
            "serve", "--base-url", url + "/v1", "--num-prompts", "5", "--input-len", "10",
            "--output-len", "3", "--request-rate", "100", "--burstiness", "0.5",
            "--goodput", "ttft:60000", "tpot:60000", "--result-json", str(out), "--plot", str(png),
            "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "Successful requests" in res.output and "TTFT" in res.output
    data = json.loads(out.read_text())
    _check_consistent(data, 5)
    assert data["config"]["request_rate"] == 100.0 and data["config"]["burstiness"] == 0.5
    assert data["summary"]["goodput"]["slo_ms"] == {"ttft": 60000.0, "tpot": 60000.0}
    assert data["summary"]["goodput"]["good_requests"] == 5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--request-rate", "fast"], "--request-rate"),
    (["--max-concurrency", "0"], "--max-concurrency"),
    (["--goodput", "latency:5"], "unknown metric"),
    (["--dataset", "nope"], "unknown dataset"),
    (["--dataset", "sharegpt"], "--dataset-path"),
    (["--endpoint", "/v1/embeddings"], "--endpoint"),
    (["--extra-body", "[1]"], "JSON object"),
    (["stray"], "unexpected arguments"),
    (["--tokenizer", "/no/such/tokenizer-dir"], "--tokenizer"),
])
def test_cli_rejects_bad_input_with_a_message(args, message):
    res = CliRunner().invoke(bench_app, ["serve", "--base-url", "http://127.0.0.1:9", *args])
    assert res.exit_code == 2
    assert message in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_default_lengths_shrink_to_fit_a_512_token_server():
    # 1024-in/128-out would not fit: every request would get a 400 and the run fail.
    with run_fake_server(max_model_len=512) as (url, fake):
        res = CliRunner().invoke(bench_app, ["serve", "--base-url", url, "--num-prompts", "4",
                                             "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "max_model_len is 512" in res.output and "shrunk to fit" in res.output
    assert len(fake.requests) == 4
    for body in fake.requests:
        assert len(body["prompt"].split()) + body["max_tokens"] <= 512
        assert body["max_tokens"] < 128


def test_lengths_given_are_kept_and_the_servers_error_is_reported():
    with run_fake_server(max_model_len=512) as (url, fake):
        res = CliRunner().invoke(bench_app, ["serve", "--base-url", url, "--num-prompts", "2",
                                             "--input-len", "600", "--output-len", "8",
                                             "--no-progress"])
    assert res.exit_code == 1, res.output
    assert all(body["max_tokens"] == 8 for body in fake.requests)
    text = " ".join(res.output.split())   # rich wraps long lines
    assert "maximum context length is 512" in text
    assert "longer than its context" in text and "ignore_eos" not in text.split("hint:")[1]


def test_a_sweep_fits_every_point():
    with run_fake_server(max_model_len=256) as (url, fake):
        res = CliRunner().invoke(bench_app, ["sweep", "--base-url", url, "--num-prompts", "2",
                                             "--concurrencies", "1,2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert len(fake.requests) == 4
    assert all(len(b["prompt"].split()) + b["max_tokens"] <= 256 for b in fake.requests)
