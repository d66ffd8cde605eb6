"""benchmarks/gpu_llama8b.py in its CPU smoke mode: the run completes, the JSON holds every
figure the GPU run will report, and the checkpoint it builds is a complete HF Llama model.

No timing assertions: only that the figures exist, are positive, and count the tokens asked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_llama8b.py"
sys.path.insert(0, str(SCRIPT.parent))

from gpu_llama8b_model import SMOKE, build_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("gpu_bench")
    out, model_dir = tmp / "result.json", tmp / "model"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu",
                           "--model-dir", str(model_dir), "--json", str(out),
                           "--async-scheduling", "on"],   # the GPU default, here on the CPU
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), model_dir


def test_json_has_environment_and_roofline(smoke_run):
    result, _ = smoke_run
    env = result["environment"]
    for key in ("gpu_name", "python", "torch", "triton", "transformers", "ferry"):
        assert env[key], key
    roof = result["roofline"]
    for key in ("weight_bytes", "decode_step_bytes", "copy_bandwidth_gb_s", "roofline_tok_s",
                "roofline_all_weights_tok_s"):
        assert roof[key] > 0, key
    assert roof["decode_step_bytes"] < roof["weight_bytes"]  # the embedding table is not read


@pytest.mark.parametrize("engine", ["ferry", "hf"])
def test_every_workload_has_positive_figures(smoke_run, engine):
    result, _ = smoke_run
    figures = result[engine]
    assert "error" not in figures, figures.get("error")
    assert figures["decode"]["decode_tok_s"] > 0
    if engine == "ferry":
        assert figures["async_scheduling"] is True
    assert len(figures["decode"]["decode_tok_s_runs"]) == 3
    assert 0 < figures["decode"]["roofline_ratio"]
    for w in result["workloads"]:
        if w["name"] == "decode":
            continue
        got = figures[w["name"]]
        assert got["total_tok_s"] > got["output_tok_s"] > 0
        # Every request produced exactly the asked number of tokens (ignore_eos).
        assert got["output_tokens"] == got["num_requests"] * w["output_len"]
        assert got["prompt_tokens"] == got["num_requests"] * w["input_len"]
    assert figures["throughput256"]["num_requests"] == (6 if engine == "ferry" else 4)


def test_ratios_and_targets(smoke_run):
    result, _ = smoke_run
    ratios = result["ratios_ferry_over_hf"]
    assert set(ratios) == {"decode_decode_tok_s", "throughput256_total_tok_s",
                           "throughput1024_total_tok_s"}
    assert all(r > 0 for r in ratios.values())
    targets = result["targets_h200"]
    assert targets["decode_tok_s"]["target"] == 240
    assert targets["throughput256_total_tok_s"]["target"] == 25_000
    assert targets["decode_roofline_ratio"]["met"] == (
        result["ferry"]["decode"]["roofline_ratio"] >= 0.85)


def test_built_checkpoint_is_a_complete_hf_llama(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, model_dir = smoke_run
    assert len(list(model_dir.glob("model-*.safetensors"))) > 1  # sharded, as the 8B one
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) * 4 == result["roofline"]["weight_bytes"]
    assert model.config.hidden_size == SMOKE.hidden and model.config.vocab_size == SMOKE.vocab
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    assert not model.config.tie_word_embeddings
    assert torch.equal(params["model.norm.weight"], torch.ones(SMOKE.hidden))
    std = params["model.layers.1.mlp.down_proj.weight"].std().item()
    assert 0.015 < std < 0.025
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == SMOKE.vocab
    assert (tok.bos_token_id, tok.eos_token_id) == (SMOKE.bos_id, SMOKE.eos_id)
    assert tok.encode("t5 t17", add_special_tokens=False) == [5, 17]


def test_model_dir_is_reused_and_foreign_dirs_refused(tmp_path, capsys):
    target = tmp_path / "m"
    build_model_dir(target, SMOKE, torch.float32, torch.device("cpu"), shard_bytes=100_000)
    first = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    build_model_dir(target, SMOKE, torch.float32, torch.device("cpu"), shard_bytes=100_000)
    assert "reusing" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == first
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not built by this script"):
        build_model_dir(foreign, SMOKE, torch.float32, torch.device("cpu"))
