"""Each rank's part of a quantized checkpoint (built in this process: loading needs no
collectives), against the same rank's part of the dequantized float checkpoint: every
linear gives the same partial product on the same input. Checkpoints are written by
ferry's packers (``tests/quant/checkpoints.py``) from the tiny llama (hidden 64, MLP 128):
with group size 32 a row-parallel rank holds whole groups (o_proj 1, down_proj 2 of 4),
rank 1's starting at the whole layer's group 1 or 2; group size -1 is one group per
output channel that every rank shares. An act-order ``g_idx`` mixing the ranks' input
slices, and a group that straddles two ranks, are refused naming the layer."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ferry.checkpoint import load_hf_config
from ferry.distributed.state import ParallelContext, RankLayout
from ferry.layers.linear import LinearBase
from ferry.models.parallel_model import build_rank_model
from ferry.models.tensor_parallel import RowParallelMethod
from ferry.quant import resolve_quantization

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quant"))
from checkpoints import write_quantized  # noqa: E402

CASES = {
    "gptq-g32-asym": dict(fmt="gptq", group_size=32, sym=False),
    "gptq-channel": dict(fmt="gptq", group_size=-1),
    "awq-g32": dict(fmt="awq", group_size=32),
    "ct-g32": dict(fmt="compressed-tensors", group_size=32),
    "ct-g32-asym": dict(fmt="compressed-tensors", group_size=32, sym=False),
    "ct-channel": dict(fmt="compressed-tensors", group_size=-1),
}


def _rank_model(path: Path, tp_rank: int):
    hf_config = load_hf_config(path)
    methods = resolve_quantization(hf_config).weight_methods
    ctx = ParallelContext(RankLayout(rank=tp_rank, tp_size=2))
    return build_rank_model(path, hf_config, torch.float32, torch.device("cpu"), ctx, methods)


def _partial_product(layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
    """This rank's product before the row-parallel all-reduce (no bias)."""
    method = layer.weight_method
    method = method.inner if isinstance(method, RowParallelMethod) else method
    return method.apply(layer, x, None)


def _linears(model) -> dict[str, LinearBase]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, LinearBase) and name != "lm_head"}


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_part_equals_the_dequantized_part(tiny_model_dir, tmp_path, case):
    path, ref = write_quantized(tiny_model_dir("llama"), tmp_path / "q", tmp_path / "ref",
                                **CASES[case])
    gen = torch.Generator().manual_seed(0)
    for tp_rank in (0, 1):
        quantized, reference = _linears(_rank_model(path, tp_rank)), _linears(_rank_model(ref, tp_rank))
        assert quantized.keys() == reference.keys() and len(quantized) == 8
        for name, layer in quantized.items():
            assert not hasattr(layer, "weight"), name          # really the quantized method
            x = torch.randn(3, layer.input_size, generator=gen)
            torch.testing.assert_close(_partial_product(layer, x),
                                       _partial_product(reference[name], x),
                                       rtol=1e-4, atol=1e-4, msg=f"{case} rank {tp_rank} {name}")


def test_act_order_across_the_ranks_slices_is_refused(tiny_model_dir, tmp_path):
    path, _ = write_quantized(tiny_model_dir("llama"), tmp_path / "q", tmp_path / "ref", "gptq",
                              group_size=32, act_order=True)
    with pytest.raises(ValueError, match=r"o_proj: this rank's inputs 32\.\.63 of 64 .*act-order"):
        _rank_model(path, 1)


def test_a_group_straddling_two_ranks_is_refused(tiny_model_dir, tmp_path):
    # o_proj has 64 inputs: one group of 64, which two ranks of 32 inputs would split
    path, _ = write_quantized(tiny_model_dir("llama"), tmp_path / "q", tmp_path / "ref", "awq",
                              group_size=64)
    with pytest.raises(ValueError, match="o_proj: this rank's 32 inputs are not a multiple of "
                                         "the quantization group size 64"):
        _rank_model(path, 0)
