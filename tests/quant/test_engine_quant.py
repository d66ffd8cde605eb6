"""Quantized checkpoints through the whole engine (sync, async scheduling, chunked prefill),
the refusals, and where ``quant_type`` shows (RuntimeConfig, metrics label, /v1/models)."""
from __future__ import annotations

import json
import shutil

import pytest

from checkpoints import write_quantized, write_w8
from ferry import LLM, SamplingParams
from hf_reference import assert_greedy_matches, hf_greedy

PROMPTS = [[11, 25, 37, 48, 59, 61, 72], [90, 14, 15, 16, 23, 42, 101, 7, 8, 9, 10, 200, 33]]
SETTINGS = {"sync": dict(async_scheduling="off"),
            "async": dict(async_scheduling="on"),
            "chunked": dict(async_scheduling="on", max_num_batched_tokens=8)}


@pytest.fixture(scope="module")
def gptq_dirs(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("gptq")
    return write_quantized(tiny_model_dir("llama"), base / "q", base / "ref", "gptq", bits=4,
                           group_size=32, sym=False, act_order=True)


@pytest.fixture(scope="module")
def awq_dirs(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("awq")
    return write_quantized(tiny_model_dir("qwen2"), base / "q", base / "ref", "awq", group_size=32)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_greedy_tokens_equal_hf_on_dequantized_weights(fmt, setting, gptq_dirs, awq_dirs):
    path, ref = gptq_dirs if fmt == "gptq" else awq_dirs
    llm = LLM(str(path), dtype="float32", block_size=4, kv_cache_memory="16MiB",
              **SETTINGS[setting])
    assert llm.engine.runtime.quant_type == ("gptq_int4" if fmt == "gptq" else "awq_int4")
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    for prompt, out in zip(PROMPTS, outs):
        assert_greedy_matches(out.outputs[0].token_ids, hf_greedy(str(ref), prompt, 10),
                              f"{fmt} {setting}")


def test_w8a8_runs_through_the_engine(tiny_model_dir, tmp_path):
    path, _ = write_w8(tiny_model_dir("llama"), tmp_path / "q", tmp_path / "ref", kind="int8")
    llm = LLM(str(path), dtype="float32", block_size=4, kv_cache_memory="16MiB",
              async_scheduling="on", max_num_batched_tokens=8)
    assert llm.engine.quant_type == "int8"
    out = llm.generate([{"prompt_token_ids": PROMPTS[1]}],
                       SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6


def _with_quant_config(src, dst, qc):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "gptq", "bits": 3}, "bits=3 is not supported"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
    ({"quant_method": "gptq", "bits": 4, "lm_head": True}, "lm_head=true"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version='gemv' is not supported"),
    ({"quant_method": "awq", "bits": 8}, "bits=8 is not supported for awq"),
    ({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes' is not supported"),
    ({"quant_method": "fp8", "activation_scheme": "weird"}, "activation_scheme='weird'"),
    ({"quant_method": "fp8", "kv_cache_scheme": "dynamic"}, "kv_cache_scheme='dynamic'"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24", "config_groups": {}},
     "format='marlin-24'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "tensor"}}}},
     "strategy 'tensor'"),
])
def test_unsupported_configs_are_refused_naming_the_key(qc, message, tiny_model_dir, tmp_path):
    path = _with_quant_config(tiny_model_dir("llama"), tmp_path / "bad", qc)
    with pytest.raises(ValueError, match=message):
        LLM(str(path), dtype="float32", kv_cache_memory="16MiB")


def test_forced_quant_type_must_match(gptq_dirs, tiny_model_dir):
    path, _ = gptq_dirs
    with pytest.raises(ValueError, match="quant_type='awq_int4' does not match"):
        LLM(str(path), quant_type="awq_int4", kv_cache_memory="16MiB")
    with pytest.raises(ValueError, match="quant_type='gptq_int4' needs a checkpoint"):
        LLM(str(tiny_model_dir("llama")), quant_type="gptq_int4", kv_cache_memory="16MiB")
    with pytest.raises(ValueError, match="quant_type=.* does not match"):
        LLM(str(path), quant_type="none", kv_cache_memory="16MiB")
    with pytest.raises(ValueError, match="bad"):   # pydantic: not one of the listed values
        LLM(str(path), quant_type="bad")


def test_quant_type_reaches_metrics_and_models_route(gptq_dirs):
    from fastapi.testclient import TestClient

    from ferry.config import ServerConfig
    from ferry.server.api_server import build_app

    path, _ = gptq_dirs
    llm = LLM(str(path), dtype="float32", kv_cache_memory="16MiB")
    with TestClient(build_app(llm.engine, ServerConfig())) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["quant_type"] == "gptq_int4"
        assert 'quant_type="gptq_int4"' in client.get("/metrics").text



def test_cpu_int8_activations_reach_a_gptq_model_through_the_engine(tiny_model_dir, tmp_path):
    path, _ = write_quantized(tiny_model_dir("llama"), tmp_path / "q", tmp_path / "ref", "gptq",
                              bits=4, group_size=64, sym=True, act_order=False)
    llm = LLM(str(path), dtype="float32", block_size=4, kv_cache_memory="16MiB",
              cpu_int8_activations=True)
    layer = llm.engine.executor.runner.model.model.layers[0]
    assert layer.mlp.down_proj.weight_method.int8_activations
    assert layer.mlp.down_proj.weight_method.fused_projection(layer.mlp.down_proj).int8_activations
    out = llm.generate([{"prompt_token_ids": PROMPTS[1]}],
                       SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6
