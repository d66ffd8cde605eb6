"""Triton twin of the attention debug trace (``ferry.kernels.attention_trace``, the PyTorch
reference op): per traced row and head, the softmax entropy and the top-k attended
positions, read from q and the paged K cache in place.

One program per (traced row, query head). It walks the row's visible keys (causal,
sliding window) through the block table in tiles of ``BLOCK_N`` positions: a first pass
keeps the running max and sum of the scaled scores (float32, ``(q . k) * scale`` as the
reference), a second sums the entropy, then ``top_k`` more passes each pick the next
largest weight, of equal weights the lower position, exactly the reference's order. A
debug trace runs only for traced rows, so its k + 2 passes over the keys (recomputed, no
scratch the size of the context) are the price of exact ties and bounded memory.

An FP8 (e4m3) cache is read as the attention kernels read it, cast to float32 on load;
the layer folds k_scale into ``scale``, so the scores are the dequantized keys'.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# By its module path: the package attribute ``ferry.kernels.attention_trace`` is the dispatch.
from ferry.kernels.attention_trace import AttentionTrace, TraceRows
from ferry.kernels.attention_trace import attention_trace as reference_trace
from ferry.kernels.attn_metadata import AttentionMetadata
from ferry.kernels.triton._common import (AOT_HEAD_DIMS, AOT_PAGE_SIZE, KernelVariant,
                                          check_same_device, launch, next_power_of_2)
from ferry.kernels.triton.attention_fp8 import fp8_cache_variants

BLOCK_N = 64   # key positions per tile


@triton.jit
def _scores(q, k_cache_ptr, table_ptr, start, lo, position, kv_head, scale,
            stride_cache_block, stride_cache_slot,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
            PAGE_SIZE: tl.constexpr):
    """(positions, scaled scores, visible) of the tile at ``start``; -inf where not visible."""
    positions = start + tl.arange(0, BLOCK_N)
    visible = (positions >= lo) & (positions <= position)
    offs_d = tl.arange(0, BLOCK_D)
    block = tl.load(table_ptr + positions // PAGE_SIZE, mask=visible, other=0).to(tl.int64)
    rows = block * stride_cache_block + (positions % PAGE_SIZE) * stride_cache_slot
    keys = tl.load(k_cache_ptr + rows[:, None] + kv_head * HEAD_DIM + offs_d[None, :],
                   mask=visible[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    scores = tl.sum(keys.to(tl.float32) * q[None, :], axis=1) * scale
    return positions.to(tl.int64), tl.where(visible, scores, float("-inf")), visible


@triton.jit
def attention_trace_kernel(
    q_ptr,                       # (T, H, D), heads packed per token
    k_cache_ptr,                 # (num_blocks, page_size, Hkv, D)
    block_tables_ptr,            # (B, stride_table) int32
    rows_ptr, seqs_ptr, positions_ptr,   # (R,) int64 each
    entropy_ptr, top_positions_ptr, top_weights_ptr,   # (R, H), (R, H, K), (R, H, K)
    stride_qt, stride_table, stride_cache_block, stride_cache_slot,
    num_heads, group, scale, sliding_window, top_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    r = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(rows_ptr + r)
    position = tl.load(positions_ptr + r)
    table_ptr = block_tables_ptr + tl.load(seqs_ptr + r) * stride_table
    lo = tl.where(sliding_window > 0, tl.maximum(position - sliding_window + 1, 0), 0)
    kv_head = head // group
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + row * stride_qt + head * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM,
                other=0.0).to(tl.float32)
    first = (lo // BLOCK_N) * BLOCK_N

    # Pass 1: the softmax's max and sum, online.
    m = tl.max(tl.full([BLOCK_N], -1.0e30, tl.float32), axis=0)
    total = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    for start in range(first, position + 1, BLOCK_N):
        _, scores, _ = _scores(q, k_cache_ptr, table_ptr, start, lo, position, kv_head, scale,
                               stride_cache_block, stride_cache_slot,
                               HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE)
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(scores - m_new), axis=0)
        m = m_new
    inv_l = 1.0 / total

    # Pass 2: the entropy.
    entropy = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    for start in range(first, position + 1, BLOCK_N):
        _, scores, visible = _scores(q, k_cache_ptr, table_ptr, start, lo, position, kv_head,
                                     scale, stride_cache_block, stride_cache_slot,
                                     HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE)
        p = tl.exp(scores - m) * inv_l
        terms = -p * tl.log(tl.maximum(p, 1e-30))
        entropy += tl.sum(tl.where(visible, terms, 0.0), axis=0)
    out = r * num_heads + head
    tl.store(entropy_ptr + out, entropy)

    # Then one pass per rank: the largest weight after (last_w, last_pos) in the order
    # (weight descending, position ascending); none left: position -1, weight 0.
    last_w = tl.max(tl.full([BLOCK_N], 2.0, tl.float32), axis=0)
    last_pos = tl.max(tl.full([BLOCK_N], -1, tl.int64), axis=0)
    for rank in range(0, top_k):
        best_w = tl.max(tl.full([BLOCK_N], -1.0, tl.float32), axis=0)
        best_pos = tl.max(tl.full([BLOCK_N], -1, tl.int64), axis=0)
        for start in range(first, position + 1, BLOCK_N):
            positions, scores, visible = _scores(
                q, k_cache_ptr, table_ptr, start, lo, position, kv_head, scale,
                stride_cache_block, stride_cache_slot, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE)
            p = tl.exp(scores - m) * inv_l
            after = (p < last_w) | ((p == last_w) & (positions > last_pos))
            candidate = tl.where(visible & after, p, -1.0)
            tile_w = tl.max(candidate, axis=0)
            tile_pos = tl.min(tl.where((candidate == tile_w) & visible & after, positions,
                                       2147483647), axis=0)
            better = tile_w > best_w   # of equal weights the earlier tile's position stays
            best_pos = tl.where(better, tile_pos, best_pos)
            best_w = tl.maximum(best_w, tile_w)
        found = best_w >= 0.0
        tl.store(top_positions_ptr + out * top_k + rank, tl.where(found, best_pos, -1))
        tl.store(top_weights_ptr + out * top_k + rank, tl.where(found, best_w, 0.0))
        last_w = best_w
        last_pos = best_pos


def attention_trace(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, trace: TraceRows, top_k: int = 8,
                    sliding_window: int | None = None) -> AttentionTrace:
    """Same signature and results as ``ferry.kernels.attention_trace.attention_trace``; a
    cache of the query's dtype or FP8 runs here, another or one with a strided last dim
    goes there."""
    if kv_cache.dtype not in (query.dtype, torch.float8_e4m3fn) or kv_cache.stride(-1) != 1:
        return reference_trace(query, kv_cache, meta, scale, trace, top_k, sliding_window)
    _check_args(query, kv_cache, meta, trace, top_k)
    num_rows, num_heads, head_dim = len(trace.rows), query.shape[1], query.shape[2]
    device = query.device
    entropy = torch.empty(num_rows, num_heads, dtype=torch.float32, device=device)
    top_positions = torch.empty(num_rows, num_heads, top_k, dtype=torch.int64, device=device)
    top_weights = torch.empty(num_rows, num_heads, top_k, dtype=torch.float32, device=device)
    if num_rows == 0:
        return AttentionTrace(entropy, top_positions, top_weights)
    if query.stride(2) != 1 or query.stride(1) != head_dim:
        query = query.contiguous()
    rows = torch.tensor([trace.rows, trace.seqs, trace.positions], dtype=torch.int64,
                        device=device)
    tables = meta.block_tables.to(device=device, dtype=torch.int32)
    keys = kv_cache[0]
    launch(attention_trace_kernel, (num_rows, num_heads),
           query, keys, tables, rows[0], rows[1], rows[2], entropy, top_positions, top_weights,
           query.stride(0), tables.stride(0), keys.stride(0), keys.stride(1),
           num_heads, num_heads // kv_cache.shape[3], float(scale), int(sliding_window or 0),
           int(top_k), HEAD_DIM=head_dim,
           BLOCK_D=next_power_of_2(head_dim), BLOCK_N=BLOCK_N, PAGE_SIZE=kv_cache.shape[2],
           num_warps=4)
    return AttentionTrace(entropy, top_positions, top_weights)


def _check_args(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                trace: TraceRows, top_k: int) -> None:
    """Host-side only (the rows are host lists): a bad row would read outside the cache."""
    if query.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[4] != query.shape[2]:
        raise ValueError(f"attention_trace: query (T, H, D) and kv_cache (2, blocks, "
                         f"block_size, Hkv, D) expected, got {tuple(query.shape)} and "
                         f"{tuple(kv_cache.shape)}")
    if query.shape[1] % kv_cache.shape[3] or top_k < 1:
        raise ValueError(f"attention_trace: {query.shape[1]} heads over {kv_cache.shape[3]} "
                         f"KV heads, top_k {top_k}")
    if trace.rows and (max(trace.rows) >= query.shape[0]
                       or max(trace.seqs) >= meta.block_tables.shape[0]
                       or max(trace.positions) >= meta.block_tables.shape[1] * meta.block_size):
        raise ValueError("attention_trace: a traced row is outside the batch or its block table")
    check_same_device(query, kv_cache)


def aot_variants(dtype: str, arch: str) -> list[KernelVariant]:
    """One compilation per head dim (the cache in the query's dtype), and one over an fp8
    cache where the target has e4m3."""
    types = {"q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "block_tables_ptr": "*i32",
             "rows_ptr": "*i64", "seqs_ptr": "*i64", "positions_ptr": "*i64",
             "entropy_ptr": "*fp32", "top_positions_ptr": "*i64", "top_weights_ptr": "*fp32",
             "num_heads": "i32", "group": "i32", "scale": "fp32", "sliding_window": "i32", "top_k": "i32"}
    variants = [KernelVariant(attention_trace_kernel, types,
                              {"HEAD_DIM": d, "BLOCK_D": next_power_of_2(d),
                               "BLOCK_N": BLOCK_N, "PAGE_SIZE": AOT_PAGE_SIZE},
                              num_warps=4, config=f"D={d}", dtype=dtype, head_dim=d)
                for d in AOT_HEAD_DIMS]
    return variants + fp8_cache_variants(variants, dtype, arch, cache_pointer="k_cache_ptr")
