"""Tensor parallel with an FP8 KV cache (gloo, 2 processes): ``kv_cache_dtype: fp8`` gives
every rank a float8 e4m3 cache of 1-byte elements, sized and reported as such, and the
same greedy tokens as one process with the same FP8 cache. Each run is given the memory
of exactly BLOCKS FP8 blocks of its share (TP=2: one of the two KV heads per rank), so a
cache made in the model's dtype would be four times the budget."""
from __future__ import annotations

import random

import torch

from ferry import LLM, SamplingParams
from ferry.runner.memory import kv_block_bytes

FP8 = torch.float8_e4m3fn
BLOCK = 4
BLOCKS = 32
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16   # the tiny llama's


def _run(path, prompts, tp: int):
    block_bytes = kv_block_bytes(LAYERS, KV_HEADS // tp, HEAD_DIM, BLOCK, FP8)
    budget = BLOCKS * block_bytes
    llm = LLM(str(path), dtype="float32", kv_cache_dtype="fp8", block_size=BLOCK,
              kv_cache_memory=budget, max_num_batched_tokens=16, max_model_len=128,
              distributed_timeout_seconds=60, tensor_parallel_size=tp)
    try:
        engine, executor = llm.engine, llm.engine.executor
        runner = executor.rank0.runner if tp > 1 else executor.runner
        assert {cache.dtype for cache in runner.kv_caches} == {FP8}
        assert sum(cache.nbytes for cache in runner.kv_caches) == budget   # within the budget
        assert engine.runtime.kv_cache_dtype == "float8_e4m3fn"
        assert engine.runtime.kv_block_bytes == block_bytes
        assert engine.num_blocks == BLOCKS
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert engine.get_stats().kv_cache_usage == 0.0
        return [o.outputs[0].token_ids for o in outs]
    finally:
        llm.engine.executor.shutdown()


def test_fp8_kv_cache_tp2_equals_one_process(tiny_model_dir):
    path = tiny_model_dir("llama")
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(5, 30))] for _ in range(3)]
    assert _run(path, prompts, tp=2) == _run(path, prompts, tp=1)
