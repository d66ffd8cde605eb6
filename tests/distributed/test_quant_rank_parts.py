"""Each rank's part of a quantized checkpoint (built in this process: loading needs no
collectives), against the same rank's part of the dequantized float checkpoint: every
linear gives the same partial product on the same input. Checkpoints are written by
ferry's packers (``tests/quant/checkpoints.py``) from the tiny llama (hidden 64, MLP 128):
with group size 32 a row-parallel rank holds whole groups (o_proj 1, down_proj 2 of 4),
rank 1's starting at the whole layer's group 1 or 2; group size -1 is one group per
output channel that every rank shares. An act-order ``g_idx`` mixing the ranks' input
slices, and a group that straddles two ranks, are refused naming the layer.

8-bit formats (FP8 and int8 W8A8 checkpoints, 8-bit GPTQ, FP8 on load) against the
one-process layer on the same input: a column-parallel rank's outputs are that layer's
rows of its shards; a row-parallel rank's partial product is that layer's output on the
input with zeros outside the rank's slice. The zeros leave a dynamic activation scale
(per token, per tensor, per 128-input group) what the rank computes over its own slice,
so this is exact where the two quantize alike and shows what TP changes: nothing but
the scale's extent. FP8 on load quantizes each rank's weight slice with its own
per-channel scales (row-parallel: the channel's amax over the rank's inputs)."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ferry.checkpoint import load_hf_config
from ferry.distributed.state import ParallelContext, RankLayout
from ferry.layers.linear import LinearBase
from ferry.models.parallel_model import build_rank_model
from ferry.models.tensor_parallel import RowParallelMethod
from ferry.quant import resolve_quantization
from ferry.quant.fp8 import FP8_MAX, check_whole_blocks, dynamic_scale, fp8_quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quant"))
from checkpoints import write_quantized  # noqa: E402
from quant_cases import W8_CASES, write_case, write_fp8_blocks_split_by_ranks  # noqa: E402

CASES = {
    "gptq-g32-asym": dict(fmt="gptq", group_size=32, sym=False),
    "gptq-channel": dict(fmt="gptq", group_size=-1),
    "awq-g32": dict(fmt="awq", group_size=32),
    "ct-g32": dict(fmt="compressed-tensors", group_size=32),
    "ct-g32-asym": dict(fmt="compressed-tensors", group_size=32, sym=False),
    "ct-channel": dict(fmt="compressed-tensors", group_size=-1),
    "ct-w8a16-g32": dict(fmt="compressed-tensors", bits=8, group_size=32),
    "ct-w8a16-channel-asym": dict(fmt="compressed-tensors", bits=8, group_size=-1, sym=False),
}


def _rank_model(path: Path, tp_rank: int, tp_size: int = 2, quant_type: str = "auto"):
    hf_config = load_hf_config(path)
    methods = resolve_quantization(hf_config, quant_type).weight_methods
    ctx = ParallelContext(RankLayout(rank=tp_rank, tp_size=tp_size))
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
    row = SimpleNamespace(prefix="o_proj", tp_kind="row", tp_input_part=(96, 192))
    with pytest.raises(ValueError, match=r"o_proj: this rank's inputs 96\.\.191 of 192 are not "
                                         r"whole blocks of weight_block_size 128"):
        check_whole_blocks(row, 96, [256], (128, 128))


def _shard_rows(layer: LinearBase, out: torch.Tensor) -> dict:
    """A (column) layer's output split by merged shard: {shard id: its columns}."""
    offsets = getattr(layer, "shard_offsets", None) or {None: (0, out.shape[-1])}
    return {shard: out[:, start:start + size] for shard, (start, size) in offsets.items()}


def _rank_outputs_against_one_process(single: LinearBase, ranks: list[LinearBase],
                                      x: torch.Tensor, rows_of_rank, context: str) -> None:
    """``rows_of_rank(r, layer, x_r)``: rank r's expected partial product of a row layer."""
    if isinstance(ranks[0].weight_method, RowParallelMethod):
        width = ranks[0].input_size
        for r, layer in enumerate(ranks):
            x_r = x[:, r * width:(r + 1) * width]
            torch.testing.assert_close(_partial_product(layer, x_r), rows_of_rank(r, layer, x_r),
                                       rtol=1e-5, atol=1e-5, msg=f"{context} rank {r}")
        return
    want = _shard_rows(single, _partial_product(single, x))
    got = [_shard_rows(layer, _partial_product(layer, x)) for layer in ranks]
    for shard, rows in want.items():
        torch.testing.assert_close(torch.cat([g[shard] for g in got], dim=-1), rows,
                                   rtol=1e-5, atol=1e-5, msg=f"{context} shard {shard}")


@pytest.mark.parametrize("case", list(W8_CASES))
def test_each_8bit_rank_part_is_the_one_process_layer(tiny_model_dir, tmp_path, case):
    path = write_case(tiny_model_dir, tmp_path, case)
    single = _linears(_rank_model(path, 0, tp_size=1))
    ranks = [_linears(_rank_model(path, r)) for r in (0, 1)]
    gen = torch.Generator().manual_seed(0)
    for name, layer in single.items():
        assert not hasattr(layer, "weight") or layer.weight.element_size() == 1, name   # 8-bit
        x = 4 * torch.randn(5, layer.input_size, generator=gen)

        def padded(r, rank_layer, x_r):   # the one-process layer on the rank's inputs only
            zeros = torch.zeros_like(x)
            zeros[:, r * x_r.shape[1]:(r + 1) * x_r.shape[1]] = x_r
            return _partial_product(layer, zeros)
        _rank_outputs_against_one_process(layer, [m[name] for m in ranks], x, padded,
                                          f"{case} {name}")


def _fp8_rows(w: torch.Tensor) -> torch.Tensor:
    """``w`` as FP8 with a scale per row, dequantized (what FP8 on load keeps)."""
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return fp8_quantize(w, scale).float() * scale


def test_on_load_fp8_rank_parts(tiny_model_dir):
    path = tiny_model_dir("llama")
    single = _linears(_rank_model(path, 0, tp_size=1, quant_type="fp8"))
    ranks = [_linears(_rank_model(path, r, quant_type="fp8")) for r in (0, 1)]
    floats = [_linears(_rank_model(path, r)) for r in (0, 1)]   # the ranks' float slices
    gen = torch.Generator().manual_seed(0)
    for name, layer in single.items():
        assert layer.weight.dtype == torch.float8_e4m3fn, name

        def own_scales(r, rank_layer, x_r):   # per-token FP8 inputs, the slice's own scales
            x_scale = dynamic_scale(x_r, -1)
            x_deq = fp8_quantize(x_r, x_scale).float() * x_scale
            return x_deq @ _fp8_rows(floats[r][name].weight.float()).t()
        x = 4 * torch.randn(5, layer.input_size, generator=gen)
        _rank_outputs_against_one_process(layer, [m[name] for m in ranks], x, own_scales,
                                          f"on-load fp8 {name}")


def test_fp8_blocks_straddling_two_ranks_are_refused(tiny_model_dir, tmp_path):
    path = write_fp8_blocks_split_by_ranks(tiny_model_dir, tmp_path)
    _rank_model(path, 0, tp_size=1)   # one process loads it
    with pytest.raises(ValueError, match=r"qkv_proj: output sizes \[128, 64, 64\] are not "
                                         r"multiples of weight_block_size 128 \(this rank's share"):
        _rank_model(path, 0)
    row = SimpleNamespace(prefix="o_proj", tp_kind="row", tp_input_part=(96, 192))
    with pytest.raises(ValueError, match=r"o_proj: this rank's inputs 96\.\.191 of 192 are not "
                                         r"whole blocks of weight_block_size 128"):
        check_whole_blocks(row, 96, [256], (128, 128))
