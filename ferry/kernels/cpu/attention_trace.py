"""The attention debug trace through the C++ kernel (``csrc/attention_trace.cpp``).

Same signature and results as ``ferry.kernels.attention_trace.attention_trace`` (the
PyTorch reference op); an FP8 (e4m3fn) cache goes to the kernel's FP8 twin, which widens
each key on read as the FP8 attention does; inputs the kernel does not take (float16, a
cache of another dtype, a non-contiguous cache) go to the reference. Of equal weights the
kernel lists the lower position first.
"""
from __future__ import annotations

import torch

# By its module path: the package attribute ``ferry.kernels.attention_trace`` is the dispatch.
from ferry.kernels.attention_trace import AttentionTrace, TraceRows
from ferry.kernels.attention_trace import attention_trace as reference_trace
from ferry.kernels.attn_metadata import AttentionMetadata
from ferry.kernels.cpu._lib import DTYPE_CODES, FP8_CACHE_DTYPE, check, functions, heads_layout


def supports(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    return (functions() is not None and query.dtype in DTYPE_CODES
            and kv_cache.dtype in (query.dtype, FP8_CACHE_DTYPE) and kv_cache.is_contiguous()
            and heads_layout(query) is not None)


def attention_trace(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, trace: TraceRows, top_k: int = 8,
                    sliding_window: int | None = None) -> AttentionTrace:
    if not supports(query, kv_cache):
        return reference_trace(query, kv_cache, meta, scale, trace, top_k, sliding_window)
    _check(query, kv_cache, meta, trace, top_k, sliding_window)
    num_rows, num_heads, head_dim = len(trace.rows), query.shape[1], query.shape[2]
    entropy = torch.empty(num_rows, num_heads, dtype=torch.float32)
    top_positions = torch.empty(num_rows, num_heads, top_k, dtype=torch.int64)
    top_weights = torch.empty(num_rows, num_heads, top_k, dtype=torch.float32)
    if num_rows == 0:
        return AttentionTrace(entropy, top_positions, top_weights)
    rows = torch.tensor([trace.rows, trace.seqs, trace.positions], dtype=torch.int64)
    block_tables = meta.block_tables.to(torch.int32).contiguous()
    kernel = (functions().attention_trace_fp8 if kv_cache.dtype == FP8_CACHE_DTYPE
              else functions().attention_trace)
    status = kernel(
        DTYPE_CODES[query.dtype], query.data_ptr(), heads_layout(query), kv_cache[0].data_ptr(),
        kv_cache.shape[1], block_tables.data_ptr(), block_tables.shape[1], rows[0].data_ptr(),
        rows[1].data_ptr(), rows[2].data_ptr(), num_rows, num_heads, kv_cache.shape[3],
        head_dim, kv_cache.shape[2], scale, sliding_window or 0, top_k, entropy.data_ptr(),
        top_positions.data_ptr(), top_weights.data_ptr(), torch.get_num_threads())
    check(status, "attention_trace")
    return AttentionTrace(entropy, top_positions, top_weights)


def _check(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
           trace: TraceRows, top_k: int, sliding_window: int | None) -> None:
    """The shape contract the reference enforces by raising; the kernel checks the block
    table and positions itself (a bad one returns a status, never reads outside)."""
    if query.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[4] != query.shape[2]:
        raise ValueError(f"attention_trace: query (T, H, D) and kv_cache (2, blocks, "
                         f"block_size, Hkv, D) expected, got {tuple(query.shape)} and "
                         f"{tuple(kv_cache.shape)}")
    if top_k < 1:
        raise ValueError(f"attention_trace: top_k must be >= 1, got {top_k}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if trace.rows and max(trace.rows) >= query.shape[0]:
        raise ValueError(f"attention_trace: row {max(trace.rows)} is outside the batch "
                         f"({query.shape[0]} rows)")
    if trace.seqs and max(trace.seqs) >= meta.block_tables.shape[0]:
        raise ValueError(f"attention_trace: sequence {max(trace.seqs)} has no block table row")
    if len(trace.rows) != len(trace.seqs) or len(trace.rows) != len(trace.positions):
        raise ValueError("attention_trace: rows, seqs and positions must have one entry each")
