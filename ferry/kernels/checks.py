"""Argument checks shared by the attention backends (reference, C++ CPU, Triton).

Each backend calls :func:`check_paged_attention_args` first and adds only its own limits
(Triton's largest head dim, contiguity, one device). The check runs once per layer per
step, so it compares shapes and host-side metadata only: no device sync, no ``.item()``,
no tensor reduction; the per-sequence lists are walked by C builtins (``sum``, ``max``,
``list.count``), not Python loops.
"""
from __future__ import annotations

import torch

from ferry.kernels.attn_metadata import AttentionMetadata


def check_paged_attention_args(query: torch.Tensor, kv_cache: torch.Tensor,
                               meta: AttentionMetadata, sliding_window: int | None) -> None:
    """Raise ``ValueError`` when ``paged_attention(query, kv_cache, meta, scale,
    sliding_window)`` would compute garbage or read outside the cache.

    The contract: ``sliding_window`` is None or >= 1; query is (T, H, D), kv_cache is
    (2, num_blocks, block_size, Hkv, D) with the same D, H a multiple of Hkv, and
    ``block_size == meta.block_size``; the block tables have a column for every block of
    the longest sequence; the first ``meta.num_decodes`` sequences have query_len 1; the
    metadata covers at most T tokens (rows past them are padding).
    """
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if query.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"query must be (T, H, D) and kv_cache (2, num_blocks, block_size, Hkv, D), "
                         f"got {tuple(query.shape)} and {tuple(kv_cache.shape)}")
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    if kv_cache.shape[4] != head_dim:
        raise ValueError(f"head dim of query ({head_dim}) and kv_cache ({kv_cache.shape[4]}) differ")
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of the cache's "
                         f"KV heads ({num_kv_heads})")
    if block_size != meta.block_size:
        raise ValueError(f"kv_cache block size {block_size} != metadata block_size {meta.block_size}")
    _check_metadata(meta, num_tokens)


def _check_metadata(meta: AttentionMetadata, num_tokens: int) -> None:
    if meta.max_seq_len > meta.block_tables.shape[1] * meta.block_size:
        raise ValueError(f"block_tables ({meta.block_tables.shape[1]} blocks per sequence) are "
                         f"too narrow for the longest sequence ({meta.max_seq_len} tokens)")
    decodes = meta.query_lens_cpu[:meta.num_decodes]
    if decodes.count(1) != len(decodes):
        raise ValueError("the first meta.num_decodes sequences must have query_len == 1")
    covered = sum(meta.query_lens_cpu)
    if covered > num_tokens:
        raise ValueError(f"metadata covers {covered} tokens, query has {num_tokens}")
