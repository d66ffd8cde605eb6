"""paged_attention through the C++ kernel (``csrc/paged_attention.cpp``).

Same signature and semantics as ``ferry.kernels.reference.paged_attention``; dtypes the
kernel does not handle (float16, or a cache dtype other than the query's or FP8) go to the
reference.
"""
from __future__ import annotations

import torch

from ferry.kernels import reference
from ferry.kernels.cpu._lib import DTYPE_CODES, FP8_CACHE_DTYPE, check, functions
from ferry.kernels.attn_metadata import AttentionMetadata
from ferry.kernels.checks import check_paged_attention_args


def supports(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """The query's dtype is one the kernel takes; the cache is of that dtype or FP8."""
    return (functions() is not None and query.dtype in DTYPE_CODES
            and kv_cache.dtype in (query.dtype, FP8_CACHE_DTYPE) and kv_cache.is_contiguous())


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    if not supports(query, kv_cache):
        return reference.paged_attention(query, kv_cache, meta, scale, sliding_window)
    check_paged_attention_args(query, kv_cache, meta, sliding_window)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    query = query.contiguous()
    block_tables = meta.block_tables.to(torch.int32).contiguous()
    query_start_loc = meta.query_start_loc.to(torch.int32).contiguous()
    seq_lens = meta.seq_lens.to(torch.int32).contiguous()
    out = torch.empty_like(query)
    kernel = (functions().paged_attention_fp8 if kv_cache.dtype == FP8_CACHE_DTYPE
              else functions().paged_attention)
    status = kernel(
        DTYPE_CODES[query.dtype], query.data_ptr(), kv_cache[0].data_ptr(),
        kv_cache[1].data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
        query_start_loc.data_ptr(), seq_lens.data_ptr(), meta.num_seqs, num_heads,
        num_kv_heads, head_dim, block_size, scale, sliding_window or 0, out.data_ptr(),
        torch.get_num_threads())
    check(status, "paged_attention")
    used = sum(meta.query_lens_cpu)
    if used < num_tokens:
        out[used:] = 0  # padding rows, as the reference returns them
    return out
