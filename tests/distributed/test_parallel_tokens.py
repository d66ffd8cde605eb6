"""Tensor and pipeline parallel on the CPU (gloo, 2 processes): the same greedy tokens as
one process and as Hugging Face, with chunked prefill, prefix-cache hits and preemption
in the same run (a 16-token step budget, prompts sharing a 20-token prefix, a KV cache
of 24 blocks per rank)."""
from __future__ import annotations

import random

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.runner.memory import kv_block_bytes
from hf_reference import assert_greedy_matches, hf_greedy

MAX_NEW = 8
BLOCK = 4
BLOCKS = 24

# (arch, tensor_parallel_size, pipeline_parallel_size, config overrides)
CASES = [
    ("llama", 2, 1, {}),
    ("qwen2", 2, 1, {}),                           # q/k/v bias, tied embeddings
    ("qwen3", 2, 1, {}),                           # q/k norms, explicit head_dim
    ("mistral", 2, 1, {"num_key_value_heads": 1}),  # fewer KV heads than ranks: replicated
    ("llama", 1, 2, {}),
    ("qwen2", 1, 2, {}),                           # tied head on the last stage
]


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    prefix = [rng.randrange(3, 256) for _ in range(20)]
    return [prefix + [rng.randrange(3, 256) for _ in range(rng.randint(3, 30))] for _ in range(6)]


def _rank_budget(hf_config, tp: int, pp: int) -> int:
    """Bytes of BLOCKS blocks of one rank's share (its KV heads, its stage's layers)."""
    kv = hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return BLOCKS * kv_block_bytes(hf_config.num_hidden_layers // pp, max(1, kv // tp), head_dim,
                                   BLOCK, torch.float32)


def _run(path, prompts, **kwargs):
    from transformers import AutoConfig

    tp, pp = kwargs.get("tensor_parallel_size", 1), kwargs.get("pipeline_parallel_size", 1)
    llm = LLM(str(path), dtype="float32", block_size=BLOCK, max_num_batched_tokens=16,
              max_num_seqs=6, kv_cache_memory=_rank_budget(AutoConfig.from_pretrained(path), tp, pp),
              distributed_timeout_seconds=60, **kwargs)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        stats = llm.engine.get_stats()
        return [o.outputs[0].token_ids for o in outs], stats, llm.engine.num_blocks
    finally:
        llm.engine.executor.shutdown()


@pytest.mark.parametrize("arch,tp,pp,overrides", CASES,
                         ids=[f"{a}-tp{t}-pp{p}" for a, t, p, _ in CASES])
def test_parallel_greedy_equals_one_rank_and_hf(tiny_model_dir, arch, tp, pp, overrides):
    path = tiny_model_dir(arch, **overrides)
    prompts = _prompts()
    single, _, _ = _run(path, prompts)
    tokens, stats, num_blocks = _run(path, prompts, tensor_parallel_size=tp,
                                     pipeline_parallel_size=pp)
    assert num_blocks == BLOCKS   # the minimum over ranks of what each rank's budget holds
    assert stats.prefix_cache_hits > 0 and stats.preemptions > 0
    assert stats.kv_cache_usage == 0.0
    for i, (got, prompt) in enumerate(zip(tokens, prompts)):
        assert_greedy_matches(got, hf_greedy(str(path), prompt, MAX_NEW), f"{arch} prompt {i}")
    assert tokens == single
