"""Tensor parallel with quantized formats (gloo, 2 processes): the same greedy tokens with
TP=2 as in one process, and the format reported.

- ``quant_type: int8`` (round-to-nearest while loading, ``quant/on_load_rtn.py``): each
  rank quantizes its own slice; with the widths here every rank's slice of a
  row-parallel input (o_proj 128, down_proj 256 of 256 and 512) is a whole number of
  128-wide groups on the same boundaries, so the ranks' scales are one process's scales,
  cut in two.
- Checkpoints written by ferry's packers (``tests/quant/checkpoints.py``) from the tiny
  llama: GPTQ 4-bit (asymmetric, group 32), AWQ GEMM 4-bit (group 32) and
  compressed-tensors pack-quantized W4A16 (symmetric, group 32); each rank reads its
  slices of the packed weights, zeros and group scales (rank 1's row-parallel groups
  start at the whole layer's group 1 or 2). ``test_quant_rank_parts.py`` checks each
  rank's layers against the dequantized weights, per-channel groups and the refusals.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from ferry import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quant"))
from checkpoints import write_quantized  # noqa: E402

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64,
             num_key_value_heads=2, num_hidden_layers=2)
CHECKPOINTS = {"gptq": (dict(fmt="gptq", group_size=32, sym=False), "gptq_int4"),
               "awq": (dict(fmt="awq", group_size=32), "awq_int4"),
               "compressed-tensors": (dict(fmt="compressed-tensors", group_size=32), "int4")}


def _prompts():
    rng = random.Random(3)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(4, 20))] for _ in range(3)]


def _greedy(path, prompts, **kwargs):
    llm = LLM(str(path), dtype="float32", kv_cache_memory="4MiB", max_model_len=128,
              distributed_timeout_seconds=60, **kwargs)
    try:
        executor = llm.engine.executor
        model = executor.rank0.loaded.model if hasattr(executor, "rank0") else None
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.engine.runtime.quant_type, model
    finally:
        llm.engine.executor.shutdown()


def test_int8_on_load_tp2_equals_one_process(tiny_model_dir):
    path = tiny_model_dir("llama", **SHAPE)
    prompts = _prompts()
    single, _, _ = _greedy(path, prompts, quant_type="int8")
    tokens, quant_type, rank0_model = _greedy(path, prompts, quant_type="int8",
                                              tensor_parallel_size=2)
    down = rank0_model.model.layers[0].mlp.down_proj
    assert down.qweight.dtype == torch.uint8 and not hasattr(down, "weight")  # really int8
    assert down.qweight.shape[1] == SHAPE["intermediate_size"] // 2   # this rank's inputs
    assert quant_type == "int8"
    assert tokens == single


@pytest.mark.parametrize("fmt", list(CHECKPOINTS))
def test_quantized_checkpoint_tp2_equals_one_process(tiny_model_dir, tmp_path, fmt):
    options, label = CHECKPOINTS[fmt]
    path, _ = write_quantized(tiny_model_dir("llama"), tmp_path / "q", tmp_path / "ref", **options)
    prompts = _prompts()
    single, single_label, _ = _greedy(path, prompts)
    tokens, quant_type, rank0_model = _greedy(path, prompts, tensor_parallel_size=2)
    down = rank0_model.model.layers[0].mlp.down_proj
    assert down.input_size == 64 and not hasattr(down, "weight")   # this rank's half, packed
    assert quant_type == single_label == label
    assert tokens == single
