"""LoRA enabled but unused costs nothing: base-only steps run no LoRA op and give the base
outputs; bad adapter selections are clear errors; the CLI's --lora selects an adapter."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("peft")

import ferry.kernels  # noqa: E402
from ferry import LLM, LoRARequest, SamplingParams  # noqa: E402
from peft_adapters import make_adapter, merged_greedy  # noqa: E402

PROMPTS = [[5, 9, 33, 71, 2, 8, 15], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return str(make_adapter(base, tmp_path_factory.mktemp("eng") / "ad", seed=31, r=4))


def _tokens(llm, **kw):
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False, **kw)
    return [o.outputs[0].token_ids for o in outs]


def test_base_only_steps_do_no_lora_work(base, adapter, monkeypatch):
    plain = _tokens(LLM(base, dtype="float32", kv_cache_memory="32MiB"))
    llm = LLM(base, dtype="float32", kv_cache_memory="32MiB", enable_lora=True)
    llm.load_lora("ad", adapter)
    calls = []
    real = ferry.kernels.lora_shrink
    monkeypatch.setattr(ferry.kernels, "lora_shrink",
                        lambda *a: calls.append(1) or real(*a))
    assert _tokens(llm) == plain
    assert calls == [], "a step without LoRA requests ran a LoRA op"
    with_adapter = _tokens(llm, lora_request=LoRARequest("ad"))
    assert calls, "the adapter's requests ran no LoRA op"
    assert with_adapter == [[t for t, _, _ in merged_greedy(base, adapter, p, 6)] for p in PROMPTS]


def test_bad_selections(base, adapter):
    llm = LLM(base, dtype="float32", kv_cache_memory="32MiB", enable_lora=True)
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        _tokens(llm, lora_request=LoRARequest("nope"))
    with pytest.raises(ValueError, match="enable_lora"):
        _tokens(LLM(base, dtype="float32", kv_cache_memory="32MiB"),
                lora_request=LoRARequest("ad", 1, adapter))
    assert llm.engine.get_stats().num_waiting == 0 and llm.engine.lora.num_in_flight() == 0


def test_cli_generate_with_lora(base, adapter):
    prompt = "The quick brown fox"
    llm = LLM(base, dtype="float32", kv_cache_memory="32MiB", enable_lora=True)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    want = llm.generate(prompt, params, use_tqdm=False,
                        lora_request=LoRARequest("ad", 1, adapter))[0].outputs[0].text
    assert want != llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text
    result = subprocess.run(
        [sys.executable, "-m", "ferry", "generate", prompt, "--model", base, "--dtype", "float32",
         "--kv-cache-memory", "32MiB", "--max-tokens", "8", "--lora-modules", f"ad={adapter}",
         "--lora", "ad"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.rstrip("\n") == want
    bad = subprocess.run(
        [sys.executable, "-m", "ferry", "generate", prompt, "--model", base,
         "--kv-cache-memory", "32MiB", "--lora", "ad"], capture_output=True, text=True,
        timeout=300)
    assert bad.returncode == 2 and "--lora needs" in bad.stderr
