"""Tensor parallel with a quantized format (gloo, 2 processes): ``quant_type: int8``
(round-to-nearest while loading, ``quant/on_load_rtn.py``) gives the same greedy tokens
with TP=2 as in one process. Each rank quantizes its own slice; with the widths here
every rank's slice of a row-parallel input (o_proj 128, down_proj 256 of 256 and 512)
is a whole number of 128-wide groups on the same boundaries, so the ranks' scales are
one process's scales, cut in two."""
from __future__ import annotations

import random

import torch

from ferry import LLM, SamplingParams

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64,
             num_key_value_heads=2, num_hidden_layers=2)


def _greedy(path, prompts, **kwargs):
    llm = LLM(str(path), dtype="float32", quant_type="int8", kv_cache_memory="4MiB",
              max_model_len=128, distributed_timeout_seconds=60, **kwargs)
    try:
        executor = llm.engine.executor
        model = executor.rank0.loaded.model if hasattr(executor, "rank0") else None
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], model
    finally:
        llm.engine.executor.shutdown()


def test_int8_on_load_tp2_equals_one_process(tiny_model_dir):
    path = tiny_model_dir("llama", **SHAPE)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(4, 20))] for _ in range(3)]
    single, _ = _greedy(path, prompts)
    tokens, rank0_model = _greedy(path, prompts, tensor_parallel_size=2)
    down = rank0_model.model.layers[0].mlp.down_proj
    assert down.qweight.dtype == torch.uint8 and not hasattr(down, "weight")  # really int8
    assert down.qweight.shape[1] == SHAPE["intermediate_size"] // 2   # this rank's inputs
    assert tokens == single
