"""The engine with async scheduling (``async_scheduling: on``) against the synchronous one.

On the CPU a launched step is already computed, but the engine's order is the GPU one:
step N is scheduled and launched with placeholders for the tokens step N-1 samples, and
N-1 is finished after. Every output (tokens, text, logprobs, finish reasons) must equal
the synchronous engine's, greedy tokens must equal HF's, and no KV block may leak.
"""
from __future__ import annotations

import random

import pytest

from ferry import LLM, SamplingParams
from hf_reference import assert_greedy_matches, hf_greedy
from test_engine_e2e import _budget_for_blocks
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("async_models")
    return {arch: str(make_tiny_model(arch, root / arch)) for arch in ["llama", "mistral", "qwen3"]}


def _prompts(seed: int, count: int, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 256) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, 256) for _ in range(rng.randint(3, 40))]
            for _ in range(count)]


def _run(llm: LLM, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
    return outs


def _summary(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason,
              None if c.logprobs is None else [(lp.token_id, round(lp.logprob, 4)) for lp in c.logprobs])
             for c in out.outputs] for out in outs]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_async_greedy_matches_sync_and_hf_in_every_batching_mode(model_dirs, arch):
    path = model_dirs[arch]
    prompts = _prompts(seed=2, count=8, shared_prefix=20)
    max_tokens = [1, 10, 4, 10, 7, 2, 10, 5]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    modes = {
        "plain": dict(),
        "chunked": dict(max_num_batched_tokens=16),
        "preempt": dict(kv_cache_memory=_budget_for_blocks(path, 18), max_num_seqs=8),
    }
    for mode, kwargs in modes.items():
        kwargs.setdefault("kv_cache_memory", "64MiB")
        results = {}
        for setting in ("off", "on"):
            llm = LLM(path, dtype="float32", block_size=4, async_scheduling=setting, **kwargs)
            assert llm.engine.async_scheduling is (setting == "on")
            results[setting] = [o.outputs[0].token_ids for o in _run(llm, prompts, params)]
            if mode == "preempt":
                assert llm.engine.get_stats().preemptions > 0
        assert results["on"] == results["off"], mode
    for prompt, tokens, n in zip(prompts, results["on"], max_tokens):
        assert_greedy_matches(tokens, hf_greedy(path, prompt, n), f"{arch}/async")


def test_every_sampling_feature_gives_the_sync_outputs(model_dirs):
    """Seeds, penalties (which make the engine finish the step in flight first), logprobs,
    n, min_tokens, stop token ids and stop strings."""
    path = model_dirs["llama"]
    prompts = _prompts(seed=4, count=7)
    sync = LLM(path, dtype="float32", kv_cache_memory="64MiB", async_scheduling="off")
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    greedy = [c.outputs[0] for c in _run(sync, prompts, plain)]
    g4, g5, text6 = greedy[4].token_ids, greedy[5].token_ids, greedy[6].text
    assert g4[3] not in g4[:3]
    j5 = next(j for j in range(3, 12) if g5[j] not in g5[:j])   # its first new token after 3
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5,
                       max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=5, logprobs=3, max_tokens=6, ignore_eos=True),
        SamplingParams(n=2, temperature=1.0, seed=2, max_tokens=5, ignore_eos=True),
        # Masked for the first 3 outputs, so it stops exactly at the 4th: a miscount of the
        # outputs (a placeholder not counted) would mask it once more.
        SamplingParams(temperature=0.0, min_tokens=3, max_tokens=8, stop_token_ids=[g4[3]]),
        SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[g5[j5]]),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[text6[4:7]]),
    ]
    expected = _summary(_run(sync, prompts, params))
    assert [o[0][2] for o in expected[4:]] == ["stop"] * 3
    assert len(expected[4][0][0]) == 4 and len(expected[5][0][0]) == j5 + 1
    llm = LLM(path, dtype="float32", kv_cache_memory="64MiB", async_scheduling="on")
    assert _summary(_run(llm, prompts, params)) == expected
    # Without the penalized request, no step is finished early: every step overlaps.
    rest = [0, 2, 3, 4, 5, 6]
    assert (_summary(_run(llm, [prompts[i] for i in rest], [params[i] for i in rest]))
            == [expected[i] for i in rest])


def test_streamed_outputs_abort_in_flight_and_stop_strings(model_dirs):
    path = model_dirs["mistral"]
    prompts = _prompts(seed=6, count=4)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def stream(setting):
        engine = LLM(path, dtype="float32", kv_cache_memory="64MiB", async_scheduling=setting).engine
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
        seen: dict[str, list[list[int]]] = {}
        steps = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                seen.setdefault(out.request_id, []).append(list(out.outputs[0].token_ids))
            steps += 1
            if steps == 3:
                engine.abort_request("r1")   # with async, r1 has a token in flight now
        stats = engine.get_stats()
        assert stats.num_running == 0 and stats.kv_cache_usage == 0.0
        return seen

    sync, overlapped = stream("off"), stream("on")
    for request_id in ("r0", "r2", "r3"):
        assert overlapped[request_id] == sync[request_id]
        assert [len(t) for t in sync[request_id]] == list(range(1, 9))   # one output per token
    # Aborted after three steps: fewer tokens, the same ones as far as they go.
    assert 1 <= len(overlapped["r1"]) < 8 and 1 <= len(sync["r1"]) < 8
    assert overlapped["r1"] == sync["r1"][:len(overlapped["r1"])]


def test_auto_turns_async_scheduling_on_only_on_a_gpu(model_dirs):
    llm = LLM(model_dirs["llama"], dtype="float32", kv_cache_memory="16MiB")
    assert llm.engine.config.scheduler.async_scheduling == "auto"
    assert llm.engine.async_scheduling is llm.engine.platform.is_gpu
    with pytest.raises(ValueError, match="async_scheduling"):
        LLM(model_dirs["llama"], async_scheduling="sometimes")
