"""The Triton attention trace kernel (ferry/kernels/triton/attention_trace.py) against the
PyTorch reference op: float32, bf16 and FP8 caches (the FP8 one against the op on its
dequantized keys), GQA, scattered block tables, decodes at
block boundaries, chunks on a prefix, sliding windows, ties (lower position first in
both), a row seeing fewer keys than top-k. Through Triton's interpreter on CPU tensors
without a GPU (TRITON_INTERPRET=1, set by tests/conftest.py), compiled on "cuda" with one.
"""
from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from attention_cases import MIXED_QUERY_LENS, MIXED_SEQ_LENS, make_batch  # noqa: E402
from triton_devices import DEVICES  # noqa: E402
from ferry.kernels.attention_trace import TraceRows, attention_trace, rows_of_sequences  # noqa: E402
from ferry.kernels.triton.attention_trace import attention_trace as triton_trace  # noqa: E402
from ferry.kernels.triton._common import launch  # noqa: E402

# By its module path: the package attribute ``ferry.kernels.triton.attention_trace`` is the op.
trace_module = importlib.import_module("ferry.kernels.triton.attention_trace")


def _assert_same_trace(got, want) -> None:
    """As the C++ kernel's test: positions equal wherever the reference's neighbouring
    ranks are not within rounding of each other."""
    got_e, got_p, got_w = got.entropy.cpu(), got.top_positions.cpu(), got.top_weights.cpu()
    torch.testing.assert_close(got_e, want.entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_w, want.top_weights, atol=1e-6, rtol=0)
    gaps = want.top_weights.diff(dim=-1).abs()
    near_tie = torch.zeros_like(want.top_weights, dtype=torch.bool)
    near_tie[..., 1:] |= gaps < 1e-6
    near_tie[..., :-1] |= gaps < 1e-6
    assert torch.equal(got_p[~near_tie], want.top_positions[~near_tie])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,window", [(2, 2, None), (6, 2, 3), (4, 1, 9)])
def test_matches_the_pytorch_op(device, dtype, num_heads, num_kv_heads, window):
    meta, cache = make_batch(MIXED_QUERY_LENS, MIXED_SEQ_LENS, num_kv_heads, 24, dtype, "cpu",
                             seed=num_heads)
    query = torch.randn(sum(MIXED_QUERY_LENS), num_heads, 24,
                        generator=torch.Generator().manual_seed(7)).to(dtype)
    rows = rows_of_sequences(meta, list(range(meta.num_seqs)), include_prompt=True, top_k=5)
    want = attention_trace(query, cache, meta, 0.2, rows, 5, window)
    meta.block_tables = meta.block_tables.to(device)
    got = triton_trace(query.to(device), cache.to(device), meta, 0.2, rows, 5, window)
    _assert_same_trace(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,window", [(2, 2, None), (6, 2, 3)])
def test_fp8_cache_is_the_op_on_its_dequantized_keys(monkeypatch, device, dtype, num_heads,
                                                     num_kv_heads, window):
    """An FP8 (e4m3fn) cache is cast on load, as the FP8 attention reads it: the kernel's
    trace is the op's on a float32 copy of the dequantized cache."""
    meta, cache = make_batch(MIXED_QUERY_LENS, MIXED_SEQ_LENS, num_kv_heads, 24, torch.float32,
                             "cpu", seed=num_heads + 1)
    fp8_cache = (cache * 4).to(torch.float8_e4m3fn)
    query = torch.randn(sum(MIXED_QUERY_LENS), num_heads, 24,
                        generator=torch.Generator().manual_seed(8)).to(dtype)
    rows = rows_of_sequences(meta, list(range(meta.num_seqs)), include_prompt=True, top_k=5)
    want = attention_trace(query, fp8_cache.float(), meta, 0.05, rows, 5, window)
    meta.block_tables = meta.block_tables.to(device)
    launches = []   # the kernel runs, no fallback to the op
    monkeypatch.setattr(trace_module, "launch",
                        lambda *a, **k: launches.append(1) or launch(*a, **k))
    got = triton_trace(query.to(device), fp8_cache.to(device), meta, 0.05, rows, 5, window)
    assert launches == [1]
    _assert_same_trace(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_keys_over_several_tiles_and_ties(device):
    """150 keys (three 64-key tiles, pages of 16); a zero query (every key alike) and a
    block table naming one page for all (each key has copies 16 positions apart)."""
    meta, cache = make_batch([1, 1], [150, 150], 2, 32, torch.float32, "cpu", seed=2,
                             block_size=16)
    meta.block_tables[1, :10] = meta.block_tables[1, 0]
    query = torch.randn(2, 4, 32)
    query[0] = 0
    rows = TraceRows(rows=[0, 1], seqs=[0, 1], positions=[149, 149], top_k=7)
    want = attention_trace(query, cache, meta, 0.3, rows, 7, None)
    assert want.top_positions[0].tolist() == [list(range(7))] * 4
    meta.block_tables = meta.block_tables.to(device)
    got = triton_trace(query.to(device), cache.to(device), meta, 0.3, rows, 7, None)
    assert torch.equal(got.top_positions[0].cpu(), want.top_positions[0])
    _assert_same_trace(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_outside_the_block_table_are_refused(device):
    meta, cache = make_batch([1], [6], 1, 8, torch.float32, device, seed=8)
    query = torch.randn(1, 1, 8, device=device)
    too_far = TraceRows([0], [0], [meta.block_tables.shape[1] * meta.block_size])
    with pytest.raises(ValueError, match="outside the batch or its block table"):
        triton_trace(query, cache, meta, 1.0, too_far, 8, None)
