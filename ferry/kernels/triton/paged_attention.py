"""Triton twin of ``reference.paged_attention``: decode and prefill kernels over the paged cache."""
from __future__ import annotations

import torch

from ferry.kernels.triton._common import check_same_device, last_dim_contiguous
from ferry.kernels.triton.paged_decode import paged_decode_attention
from ferry.kernels.triton.paged_prefill import paged_prefill_attention
from ferry.kernels.attn_metadata import AttentionMetadata
from ferry.kernels.checks import check_paged_attention_args

# Stands for "no sliding window": larger than any context, small enough for int32 maths.
NO_WINDOW = 1 << 30
MAX_HEAD_DIM = 256


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of the batch's new tokens over the paged KV cache.

    query: (T, H, D) with H a multiple of Hkv (GQA); kv_cache (2, num_blocks, block_size,
    Hkv, D) already holds the new tokens' keys and values. The first ``meta.num_decodes``
    sequences go to the split-K decode kernel, the rest to the prefill kernel. Query i of a
    sequence sits at ``p = seq_len - query_len + i`` and sees keys ``j <= p`` (and
    ``j > p - sliding_window``). Returns (T, H, D) in the query's dtype; rows past
    ``query_start_loc[-1]`` (padding) are zero.
    """
    _check_args(query, kv_cache, meta, sliding_window)
    query = last_dim_contiguous(query)
    meta = _with_int32_tables(meta)
    window = NO_WINDOW if sliding_window is None else int(sliding_window)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    num_tokens = sum(meta.query_lens_cpu)
    out[num_tokens:].zero_()
    if meta.num_decodes:
        paged_decode_attention(out, query, kv_cache, meta, scale, window)
    paged_prefill_attention(out, query, kv_cache, meta, scale, window)
    return out


def _check_args(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                sliding_window: int | None) -> None:
    """The shared checks, then the Triton kernels' own limits."""
    check_paged_attention_args(query, kv_cache, meta, sliding_window)
    if query.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {query.shape[2]} is above the Triton kernels' limit of {MAX_HEAD_DIM}")
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache's last dim must be contiguous")
    check_same_device(query, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc)


def _with_int32_tables(meta: AttentionMetadata) -> AttentionMetadata:
    """The kernels read block tables, lengths and offsets as contiguous int32 (the contract)."""
    tensors = (meta.block_tables, meta.seq_lens, meta.query_start_loc)
    if all(t.dtype == torch.int32 and t.stride(-1) == 1 for t in tensors):
        return meta
    return AttentionMetadata(
        slot_mapping=meta.slot_mapping,
        query_start_loc=meta.query_start_loc.to(torch.int32).contiguous(),
        seq_lens=meta.seq_lens.to(torch.int32).contiguous(),
        block_tables=meta.block_tables.to(torch.int32).contiguous(),
        query_lens_cpu=meta.query_lens_cpu, seq_lens_cpu=meta.seq_lens_cpu,
        num_decodes=meta.num_decodes, block_size=meta.block_size)
