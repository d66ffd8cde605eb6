"""`ferry bench throughput` / `latency` in-process on a tiny random model, and the roofline
figures checked against transformers' own count of the same model."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ferry.bench.cli import bench_app
from ferry.bench.roofline import measure_copy_bandwidth, model_cost, peak_flops

ENGINE_ARGS = ["--kv-cache-memory", "64MiB", "--device", "cpu"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def test_throughput_generates_every_asked_token(model_dir, tmp_path):
    out = tmp_path / "t.json"
    res = CliRunner().invoke(bench_app, [
        "throughput", "--model", str(model_dir), "--num-prompts", "6", "--input-len", "20",
        "--output-len", "5", "--result-json", str(out), *ENGINE_ARGS])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["num_requests"] == 6
    assert data["total_output_tokens"] == 6 * 5          # ignore_eos: exactly what was asked
    assert data["total_prompt_tokens"] == 6 * 20         # prompts are token-exact
    assert data["output_throughput"] == pytest.approx(30 / data["elapsed_s"])
    limits = data["limits"]
    assert limits["copy_bandwidth_gb_s"] > 0 and "CPU" in limits["bandwidth_note"]
    assert 0 < limits["speed_of_light_ratio"] < 1
    assert "Against the physical limits" in res.output


def test_latency_times_prefill_and_each_decode_step(model_dir, tmp_path):
    out = tmp_path / "l.json"
    res = CliRunner().invoke(bench_app, [
        "latency", "--model", str(model_dir), "--batch-size", "2", "--input-len", "12",
        "--output-len", "4", "--num-iters", "2", "--num-iters-warmup", "1",
        "--result-json", str(out), *ENGINE_ARGS])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    # Both prompts are prefilled in one step, then 3 decode steps give tokens 2..4.
    assert data["num_decode_steps"] == 2 * 3
    assert data["prefill_ms"]["min"] > 0 and data["decode_step_ms"]["min"] > 0
    assert data["e2e_ms"]["min"] >= data["prefill_ms"]["min"]
    assert 0 < data["limits"]["decode_bandwidth_utilization"]
    assert "prefill_mfu" not in data["limits"]   # no known peak FLOPs for a CPU


def test_model_cost_matches_transformers(model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ferry.llm import LLM

    llm = LLM(model=str(model_dir), kv_cache_memory="64MiB", device="cpu")
    model = llm.engine.executor.runner.model
    cost = model_cost(model, model_dir, torch.float32)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf_config = AutoConfig.from_pretrained(model_dir)
    assert cost.num_params == hf_model.num_parameters()
    assert cost.weight_bytes == 4 * hf_model.num_parameters()
    head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    assert cost.kv_bytes_per_token == (2 * hf_config.num_hidden_layers
                                       * hf_config.num_key_value_heads * head_dim * 4)
    # Untied lm_head: a decode step gathers embedding rows instead of reading the table.
    embed = hf_model.get_input_embeddings().weight.numel() * 4
    assert cost.decode_weight_bytes == cost.weight_bytes - embed


def test_bandwidth_and_peaks():
    assert measure_copy_bandwidth(torch.device("cpu"), num_bytes=1 << 22, repeats=2) > 0
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("Intel Xeon") is None


def test_offline_commands_reject_bad_input(model_dir):
    res = CliRunner().invoke(bench_app, ["latency", "--model", str(model_dir), "--batch-size", "0"])
    assert res.exit_code == 2 and "--batch-size" in res.output
    res = CliRunner().invoke(bench_app, ["throughput", "--model", str(model_dir),
                                         "--engine-arg", "nonsense"])
    assert res.exit_code == 2 and "KEY=VALUE" in res.output
    res = CliRunner().invoke(bench_app, ["throughput", "--model", str(model_dir),
                                         "--input-len", "600", "--output-len", "8",
                                         "--num-prompts", "1", *ENGINE_ARGS])
    assert res.exit_code == 2 and "context length" in res.output
