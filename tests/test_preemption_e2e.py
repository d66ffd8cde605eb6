"""Preemption by swap and by recompute through the whole engine on a tiny random model.

A KV cache of a few blocks forces preemption; the outputs (greedy and seeded sampling)
must be token-for-token those of a run with room for everything, under sync and async
scheduling, with every device and host block free at the end.
"""
from __future__ import annotations

import random

import pytest

from ferry import LLM, SamplingParams
from test_engine_e2e import _budget_for_blocks
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model("llama", tmp_path_factory.mktemp("preempt") / "llama"))


def _prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(8, 30))] for _ in range(count)]


def _run(llm: LLM, prompts):
    greedy = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_k=20, seed=7, max_tokens=14, ignore_eos=True)
    params = [greedy if i % 2 else seeded for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.kv_cache_usage == 0.0 and stats.swapped_blocks == 0        # nothing leaked
    scheduler = llm.engine.scheduler
    scheduler.swap.end_step()
    assert scheduler.swap.num_free_blocks == scheduler.swap.num_blocks
    return [o.outputs[0].token_ids for o in outs], stats


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_swap_recompute_and_no_preemption_give_identical_tokens(model_dir, async_scheduling):
    prompts = _prompts(seed=3, count=8)
    common = dict(dtype="float32", block_size=4, async_scheduling=async_scheduling,
                  max_num_seqs=8)
    small = _budget_for_blocks(model_dir, 22)
    runs = {
        "roomy": dict(kv_cache_memory="64MiB"),
        "swap": dict(kv_cache_memory=small, preemption_mode="swap", swap_space=0.01),
        "recompute": dict(kv_cache_memory=small, preemption_mode="recompute"),
        "auto": dict(kv_cache_memory=small, swap_space=0.01),
    }
    results = {}
    for name, kwargs in runs.items():
        llm = LLM(model_dir, **common, **kwargs)
        results[name], stats = _run(llm, prompts)
        if name == "roomy":
            assert stats.preemptions == 0
        elif name == "swap":
            assert stats.preemptions_swap > 0 and stats.preemptions_recompute == 0
            assert stats.recomputed_tokens == 0
        elif name == "recompute":
            assert stats.preemptions_recompute > 0 and stats.preemptions_swap == 0
            assert stats.recomputed_tokens > 0
        else:
            assert stats.preemptions > 0
    assert results["swap"] == results["roomy"]
    assert results["recompute"] == results["roomy"]
    assert results["auto"] == results["roomy"]
