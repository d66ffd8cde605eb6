"""Paged prefill attention: flash attention of prompt chunks over the paged KV cache.

Covers every sequence after the decodes: whole prompts, chunks of long prompts and
prompts on top of prefix-cache hits. The chunk's own keys are read back from the cache
(written just before by ``write_kv_cache``) together with the cached prefix, through the
block table, so there is one code path for all three.

One program handles BLOCK_M query tokens of one sequence and one query head. Query i of
a sequence sits at position p = (seq_len - query_len) + i and sees keys j with j <= p and,
with a sliding window W, j > p - W. Softmax is online (flash attention) in float32, in the
log2 domain.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ferry.kernels.triton._common import (
    AOT_HEAD_DIMS, AOT_PAGE_SIZE, KernelVariant, cdiv, interpreting_bf16, launch, next_power_of_2,
    triton_dtype,
)
from ferry.kernels.triton.attention_configs import prefill_config, prefill_configs
from ferry.kernels.triton.attention_fp8 import fp8_cache_variants
from ferry.kernels.triton.paged_tile import attend_key_tile
from ferry.platform import device_arch
from ferry.kernels.attn_metadata import AttentionMetadata


@triton.jit
def paged_prefill_kernel(
    out_ptr,                     # (T, H, D)
    query_ptr,                   # (T, H, D)
    kv_cache_ptr,                # (2, num_blocks, PAGE_SIZE, Hkv, D)
    block_tables_ptr, seq_lens_ptr, query_start_ptr,
    qk_scale, window, first_seq, group,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv, stride_kb, stride_ks, stride_kh, stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    seq = first_seq + tl.program_id(0)
    tile_start = tl.program_id(1) * BLOCK_M
    head = tl.program_id(2)
    kv_head = head // group
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if tile_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len                                # keys before the chunk (cached)

    offs_m = tile_start + tl.arange(0, BLOCK_M)               # (BLOCK_M,) rows of the chunk
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_pos = context + offs_m                                  # (BLOCK_M,) query positions
    tokens = (q_start + offs_m).to(tl.int64)
    # A cache of another dtype is cast on load. DOT_FP32 only serves Triton's CPU
    # interpreter, whose tl.dot cannot multiply bf16; compiled kernels never set it.
    dot_type = tl.float32 if DOT_FP32 else query_ptr.dtype.element_ty
    q = tl.load(query_ptr + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(dot_type)  # (BLOCK_M, BLOCK_D)

    # Keys this tile can see: from the window's start for its first row to its last row.
    key_end = tl.minimum(context + tile_start + BLOCK_M, seq_len)
    key_start = (tl.maximum(context + tile_start - window + 1, 0) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)     # finite: no NaN from masked tiles
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(key_start, key_end, BLOCK_N):
        pos = start + offs_n                                  # (BLOCK_N,) key positions
        in_range = pos < key_end
        visible = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - window) \
            & in_range[None, :]                               # (BLOCK_M, BLOCK_N)
        acc, m_i, l_i = attend_key_tile(q, acc, m_i, l_i, kv_cache_ptr, table, pos, in_range,
                                        visible, kv_head, offs_d, d_mask, qk_scale,
                                        stride_kv, stride_kb, stride_ks, stride_kh, PAGE_SIZE)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float, window: int) -> None:
    """Attention of every sequence after the decodes into out. query, out: (T, H, D)."""
    first_seq = meta.num_decodes
    num_prefills = meta.num_seqs - first_seq
    if num_prefills <= 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    max_query_len = max(meta.query_lens_cpu[first_seq:])
    config = prefill_config(head_dim, triton_dtype(query.dtype), device_arch(query.device), max_query_len)
    grid = (num_prefills, cdiv(max_query_len, config.block_m), num_heads)
    launch(paged_prefill_kernel, grid,
           out, query, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
           scale * math.log2(math.e), window, first_seq, num_heads // kv_cache.shape[3],
           query.stride(0), query.stride(1), out.stride(0), out.stride(1),
           kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
           meta.block_tables.stride(0),
           HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), BLOCK_M=config.block_m,
           BLOCK_N=config.block_n, PAGE_SIZE=kv_cache.shape[2], DOT_FP32=interpreting_bf16(query),
           num_warps=config.num_warps, num_stages=config.num_stages)


def aot_variants(dtype: str, arch: str) -> list[KernelVariant]:
    types = {"out_ptr": f"*{dtype}", "query_ptr": f"*{dtype}", "kv_cache_ptr": f"*{dtype}",
             "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_ptr": "*i32",
             "qk_scale": "fp32", "window": "i32", "first_seq": "i32", "group": "i32"}
    variants = []
    for head_dim in AOT_HEAD_DIMS:
        for config in prefill_configs(head_dim, dtype, arch):
            constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": next_power_of_2(head_dim),
                          "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                          "PAGE_SIZE": AOT_PAGE_SIZE, "DOT_FP32": False}
            label = (f"D={head_dim} M={config.block_m} N={config.block_n} "
                     f"w={config.num_warps} s={config.num_stages}")
            variants.append(KernelVariant(paged_prefill_kernel, types, constexprs, config.num_warps,
                                          config.num_stages, label, dtype, unaligned=("stride_bt",),
                                          head_dim=head_dim))
    return variants + fp8_cache_variants(variants, dtype, arch)
