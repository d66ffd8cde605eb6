"""Triton paged attention and KV-cache writes against a naive per-token PyTorch oracle.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter,
which needs TRITON_INTERPRET=1 before triton is first imported (tests/conftest.py). With a GPU the
same tests run compiled on "cuda" (NVIDIA or ROCm).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_devices import DEVICES  # noqa: E402
from ferry.kernels.triton import paged_attention, write_kv_cache  # noqa: E402
from ferry.kernels.triton.paged_decode import paged_decode_attention, plan_splits  # noqa: E402
from ferry.kernels.triton.paged_attention import NO_WINDOW  # noqa: E402
from attention_cases import (BLOCK, MIXED_QUERY_LENS, MIXED_SEQ_LENS, check,  # noqa: E402
                             make_batch, naive_attention)

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (8, 2)])
def test_mixed_batch_matches_naive(device, dtype, num_heads, num_kv_heads):
    meta, cache = make_batch(MIXED_QUERY_LENS, MIXED_SEQ_LENS, num_kv_heads, 16, dtype, device)
    query = torch.randn(sum(MIXED_QUERY_LENS), num_heads, 16, generator=torch.Generator().manual_seed(1))
    query = query.to(dtype).to(device)
    out = paged_attention(query, cache, meta, 0.25)
    assert out.dtype == dtype and out.shape == query.shape
    check(out, naive_attention(query, cache, meta, 0.25, None), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [1, 3, BLOCK, 9])
def test_sliding_window(device, window):
    meta, cache = make_batch(MIXED_QUERY_LENS, MIXED_SEQ_LENS, 2, 16, torch.bfloat16, device, seed=2)
    query = torch.randn(sum(MIXED_QUERY_LENS), 4, 16).to(torch.bfloat16).to(device)
    out = paged_attention(query, cache, meta, 0.3, sliding_window=window)
    check(out, naive_attention(query, cache, meta, 0.3, window), torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 2, 3, 5, 32])
@pytest.mark.parametrize("window", [None, 6, 45])
def test_decode_split_k(device, num_splits, window):
    """Key tiles (32 keys here) dealt round-robin over the splits and merged by the reduce
    kernel: several tiles per split, one, or none (empty splits), as a plan made for a
    longer context (device graphs) gives short ones."""
    seq_lens = [1, 5, 17, 40, 150]
    meta, cache = make_batch([1] * 5, seq_lens, 2, 32, torch.float32, device, seed=3)
    query = torch.randn(5, 4, 32).to(device)
    out = torch.zeros_like(query)
    paged_decode_attention(out, query, cache, meta, 0.2, window or NO_WINDOW, num_splits=num_splits)
    check(out, naive_attention(query, cache, meta, 0.2, window), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_long_decode_splits_by_default(device):
    """One long sequence leaves the GPU idle without split-K: the planner must split it."""
    seq_len = 600
    assert plan_splits(1, 1, seq_len) > 1
    meta, cache = make_batch([1], [seq_len], 1, 16, torch.bfloat16, device, seed=4)
    query = torch.randn(1, 2, 16).to(torch.bfloat16).to(device)
    check(paged_attention(query, cache, meta, 0.25), naive_attention(query, cache, meta, 0.25, None),
          torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_long_prefill_chunk_spans_several_tiles(device):
    """70 new tokens on a 5-token prefix: two 64-row query tiles, many key tiles."""
    meta, cache = make_batch([70], [75], 1, 16, torch.float16, device, seed=5)
    query = torch.randn(70, 2, 16).to(torch.float16).to(device)
    for window in (None, 20):
        check(paged_attention(query, cache, meta, 0.25, window),
              naive_attention(query, cache, meta, 0.25, window), torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_wide_gqa_group_and_odd_head_dim(device):
    """32 query heads on one KV head (rows beyond 16) and a head dim that is no power of 2."""
    meta, cache = make_batch([1, 3], [9, 6], 1, 24, torch.float32, device, seed=6)
    query = torch.randn(4, 32, 24).to(device)
    check(paged_attention(query, cache, meta, 0.2), naive_attention(query, cache, meta, 0.2, None),
          torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_group_wider_than_one_tile(device, num_splits):
    """A GQA group of 24 heads: two 16-row programs per KV head, the second half masked,
    both writing their own heads' partials when split."""
    meta, cache = make_batch([1, 1], [7, 40], 2, 16, torch.float32, device, seed=10)
    query = torch.randn(2, 48, 16).to(device)
    out = torch.zeros_like(query)
    paged_decode_attention(out, query, cache, meta, 0.25, NO_WINDOW, num_splits=num_splits)
    check(out, naive_attention(query, cache, meta, 0.25, None), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_largest_head_dim(device, dtype):
    """Head dim 256, the kernels' limit: its own key-tile class (halved tiles)."""
    meta, cache = make_batch([1, 20], [40, 20], 1, 256, dtype, device, seed=9)
    query = torch.randn(21, 2, 256).to(dtype).to(device)
    check(paged_attention(query, cache, meta, 0.06), naive_attention(query, cache, meta, 0.06, None),
          dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_query_and_padding_rows(device):
    """q as a view of a fused qkv tensor; rows after the batch's tokens come back zero."""
    meta, cache = make_batch([1, 4], [6, 4], 2, 16, torch.float32, device, seed=7)
    qkv = torch.randn(5 + 2, 4 * 16 + 2 * 2 * 16).to(device)      # 2 padding tokens
    query = qkv[:, :64].view(7, 4, 16)
    out = paged_attention(query, cache, meta, 0.25)
    check(out[:5], naive_attention(query[:5], cache, meta, 0.25, None), torch.float32)
    assert torch.count_nonzero(out[5:]) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_invalid_arguments_raise_value_error(device):
    meta, cache = make_batch([1], [3], 2, 16, torch.float32, device)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_attention(torch.randn(1, 4, 16).to(device), cache, meta, 1.0, sliding_window=0)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention(torch.randn(1, 3, 16).to(device), cache, meta, 1.0)
    with pytest.raises(ValueError, match="head dim"):
        paged_attention(torch.randn(1, 4, 8).to(device), cache, meta, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_scatters_rows_and_skips_padding(device, dtype):
    gen = torch.Generator().manual_seed(8)
    fused = torch.randn(6, 2, 2, 24, generator=gen).to(dtype).to(device)  # k, v interleaved
    key, value = fused[:, 0], fused[:, 1]                                   # strided views
    cache = torch.zeros(2, 5, BLOCK, 2, 24, dtype=dtype, device=device)
    slots = torch.tensor([0, 7, -1, BLOCK * 4 + 3, BLOCK, -5], dtype=torch.int64, device=device)
    write_kv_cache(key, value, cache, slots)
    expected = torch.zeros(2, 5 * BLOCK, 2, 24, dtype=dtype)
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[0, slot], expected[1, slot] = key[token].cpu(), value[token].cpu()
    assert torch.equal(cache.cpu().view(2, 5 * BLOCK, 2, 24), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_write_then_attend_like_the_layer(device):
    """The layer's flow: new K/V written through slot_mapping, then read back by attention."""
    meta, cache = make_batch([1, 5], [7, 5], 2, 16, torch.float32, device, seed=9)
    slots = []
    for seq, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(int(meta.block_tables[seq, pos // BLOCK]) * BLOCK + pos % BLOCK)
    key, value = torch.randn(6, 2, 16).to(device), torch.randn(6, 2, 16).to(device)
    write_kv_cache(key, value, cache, torch.tensor(slots, device=device))
    query = torch.randn(6, 4, 16).to(device)
    check(paged_attention(query, cache, meta, 0.25), naive_attention(query, cache, meta, 0.25, None),
          torch.float32)
