"""The whole engine against Hugging Face transformers on the same random weights.

Greedy tokens must equal HF's (up to a genuine near-tie), whatever the batching: prefix
caching on or off, chunked prefill, a KV cache so small that requests are preempted.
"""
from __future__ import annotations

import random

import pytest

from ferry import LLM, SamplingParams
from hf_reference import assert_greedy_matches, hf_greedy
from tiny_models import make_tiny_model

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
MAX_NEW = 10


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_models")
    return {arch: str(make_tiny_model(arch, root / arch)) for arch in ARCHS}


def _prompts(seed: int, count: int, vocab: int = 256, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))]
            for _ in range(count)]


def _greedy(llm: LLM, prompts: list[list[int]], max_new: int = MAX_NEW) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.kv_cache_usage == 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_batch_matches_hf(model_dirs, arch):
    llm = LLM(model_dirs[arch], dtype="float32", kv_cache_memory="64MiB")
    prompts = _prompts(seed=1, count=6)
    for prompt, tokens in zip(prompts, _greedy(llm, prompts)):
        assert_greedy_matches(tokens, hf_greedy(model_dirs[arch], prompt, MAX_NEW), arch)
    _assert_all_blocks_free(llm)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_batching_modes_give_identical_tokens(model_dirs, arch):
    """Prefix caching on/off, chunked prefill, and preemption all change how the batch is
    cut, never the tokens; each is also checked against HF."""
    prompts = _prompts(seed=2, count=8, shared_prefix=20)
    path = model_dirs[arch]
    reference = [hf_greedy(path, p, MAX_NEW) for p in prompts]
    modes = {
        "prefix_on": dict(enable_prefix_caching=True),
        "prefix_off": dict(enable_prefix_caching=False),
        "chunked": dict(max_num_batched_tokens=16, enable_prefix_caching=False),
        "preempt": dict(kv_cache_memory=_budget_for_blocks(path, 24), max_num_seqs=8),
    }
    results = {}
    for mode, kwargs in modes.items():
        kwargs.setdefault("kv_cache_memory", "64MiB")
        llm = LLM(path, dtype="float32", block_size=4, **kwargs)
        results[mode] = _greedy(llm, prompts)
        stats = llm.engine.get_stats()
        if mode == "prefix_on":
            assert stats.prefix_cache_hits > 0, "shared prefixes should hit the prefix cache"
        if mode == "preempt":
            assert stats.preemptions > 0, "a 24-block cache should force preemption"
        _assert_all_blocks_free(llm)
        for i, (tokens, ref) in enumerate(zip(results[mode], reference)):
            assert_greedy_matches(tokens, ref, f"{arch}/{mode}/prompt {i}")
    assert results["prefix_on"] == results["prefix_off"] == results["chunked"] == results["preempt"]


def _budget_for_blocks(path: str, blocks: int, block_size: int = 4) -> int:
    from transformers import AutoConfig

    import torch
    from ferry.runner.memory import kv_block_bytes

    cfg = AutoConfig.from_pretrained(path)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return blocks * kv_block_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim,
                                   block_size, torch.float32)


def test_seeded_sampling_is_batch_independent(model_dirs):
    llm = LLM(model_dirs["llama"], dtype="float32", kv_cache_memory="64MiB")
    prompts = _prompts(seed=3, count=5)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    others = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = llm.generate([{"prompt_token_ids": p} for p in prompts],
                         [params] + [others] * 4, use_tqdm=False)
    assert alone[0].outputs[0].token_ids == batch[0].outputs[0].token_ids
    _assert_all_blocks_free(llm)


def test_n_samples_and_logprobs(model_dirs):
    llm = LLM(model_dirs["qwen2"], dtype="float32", kv_cache_memory="64MiB")
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True,
                            logprobs=2)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "n samples should differ"
    for c in out.outputs:
        assert len(c.token_ids) == 8 and len(c.logprobs) == 8
        assert all(len(lp.top) == 2 for lp in c.logprobs)
        assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs))
    again = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_text_prompts_stop_strings_and_chat(model_dirs):
    llm = LLM(model_dirs["llama"], dtype="float32", kv_cache_memory="64MiB")
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = llm.generate("The quick brown fox", greedy, use_tqdm=False)[0].outputs[0]
    # Random weights may end on half a UTF-8 character; the detokenizer never shows one.
    decoded = llm.get_tokenizer().decode(full.token_ids, skip_special_tokens=True)
    assert full.text == decoded.rstrip("\ufffd")
    stop = full.text.strip()[2:5]
    if stop.strip():
        cut = llm.generate("The quick brown fox", greedy.clone(stop=[stop]), use_tqdm=False)
        completion = cut[0].outputs[0]
        assert completion.finish_reason == "stop" and completion.stop_reason == stop
        assert completion.text == full.text[: full.text.index(stop)]
    chat = llm.chat([{"role": "user", "content": "hello"}], greedy, use_tqdm=False)[0]
    expected = llm.engine.encode_chat([{"role": "user", "content": "hello"}])
    assert chat.prompt_token_ids == expected and len(chat.outputs[0].token_ids) == 12
    _assert_all_blocks_free(llm)


def test_bad_arguments_raise_value_error(model_dirs):
    llm = LLM(model_dirs["llama"], dtype="float32", kv_cache_memory="64MiB", max_model_len=64)
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate({"prompt_token_ids": list(range(3, 60))}, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        llm.generate([123])
    with pytest.raises(ValueError, match="token ids"):
        llm.generate({"prompt_token_ids": [10**9]})
    with pytest.raises(ValueError, match="unknown key"):
        LLM(model_dirs["llama"], not_a_setting=1)
    _assert_all_blocks_free(llm)


def test_a_feature_not_built_yet_is_refused_clearly(model_dirs, monkeypatch):
    """Every feature key is built today; the refusal itself still works for the next one."""
    from ferry.runner import model_setup
    monkeypatch.setattr(model_setup, "_NOT_YET", {"kv_cache_dtype": ("auto",)})
    with pytest.raises(ValueError, match="kv_cache_dtype=.*not supported"):
        LLM(model_dirs["llama"], kv_cache_dtype="fp8")


def test_quantized_checkpoint_is_refused_clearly(model_dirs, tmp_path):
    import json
    import shutil

    path = tmp_path / "quantized"
    shutil.copytree(model_dirs["llama"], path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method='bitsandbytes' is not supported"):
        LLM(str(path))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 3}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        LLM(str(path))


def test_unstreamed_requests_report_only_when_finished(model_dirs):
    """stream=False (what LLM.generate uses): one RequestOutput, at the end, with the same
    tokens and text as the streamed request's last output."""
    llm = LLM(model_dirs["llama"], dtype="float32", kv_cache_memory="64MiB")
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompt = {"prompt_token_ids": _prompts(seed=5, count=1)[0]}
    engine.add_request("streamed", prompt, params)
    engine.add_request("quiet", prompt, params, stream=False)
    seen: dict[str, list] = {"streamed": [], "quiet": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen["streamed"]) == 6 and [o.finished for o in seen["quiet"]] == [True]
    last, quiet = seen["streamed"][-1].outputs[0], seen["quiet"][0].outputs[0]
    assert quiet.token_ids == last.token_ids and quiet.text == last.text


def test_without_max_tokens_output_fills_what_a_small_cache_holds(model_dirs):
    """max_tokens None runs to the context, or to the whole KV cache when that is smaller:
    not a refusal because the context is longer than the cache."""
    llm = LLM(model_dirs["llama"], dtype="float32", block_size=4,
              kv_cache_memory=_budget_for_blocks(model_dirs["llama"], 8))
    assert llm.engine.num_blocks * 4 < llm.engine.max_model_len
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": list(range(3, 13))}], params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8 * 4 - 10
    assert out.outputs[0].finish_reason == "length"
    assert llm.engine.get_stats().kv_cache_usage == 0.0
