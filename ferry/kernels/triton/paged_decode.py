"""Paged decode attention: one query token per sequence, flash-decoding with split-K.

One program handles one (sequence, KV head, split): the G query heads that share the KV
head are stacked as the rows of one 16-row tile (GQA), so each key/value is read once per
split; a group of more than 16 heads takes several programs (the tile stays 16 rows, so
one compiled configuration serves every group size).
Long contexts are split ``num_splits`` ways, processed in parallel: the context's key tiles
are dealt round-robin (split s takes tiles s, s + num_splits, ...), each split writes its
running max, sum and unnormalised output, and a second small kernel merges them. With a
single split the first kernel writes the final output itself. Dealing tiles rather than
cutting contiguous partitions makes the split count the only plan: a plan made for the
longest context (device graphs plan for max_model_len) keeps a short context spread over
the splits too, instead of leaving it all in the first partition.

Softmax runs in the log2 domain (``exp2``, scale folded with log2(e)) in float32.
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
from ferry.kernels.triton.attention_configs import decode_config
from ferry.kernels.triton.attention_fp8 import fp8_cache_variants
from ferry.kernels.triton.paged_tile import attend_key_tile
from ferry.platform import device_arch
from ferry.kernels.attn_metadata import AttentionMetadata

# Below this many programs a long decode batch leaves the GPU idle: split the context.
TARGET_PROGRAMS = 256
MIN_PARTITION_TOKENS = 256
MAX_SPLITS = 32


def plan_splits(num_decodes: int, head_programs: int, max_seq_len: int) -> int:
    """Splits of a decode batch's contexts: enough programs to fill the GPU, each split
    with at least MIN_PARTITION_TOKENS keys of the longest context. ``head_programs``:
    programs per sequence without splits (one per KV head and block of its GQA group)."""
    programs = num_decodes * head_programs
    if programs >= TARGET_PROGRAMS or max_seq_len < 2 * MIN_PARTITION_TOKENS:
        return 1
    return min(cdiv(TARGET_PROGRAMS, programs), max_seq_len // MIN_PARTITION_TOKENS, MAX_SPLITS)


@triton.jit
def paged_decode_kernel(
    out_ptr,                     # (T, H, D) final output (DIRECT_OUTPUT)
    part_out_ptr,                # (B, H, num_splits, BLOCK_D) fp32 unnormalised partial outputs
    part_max_ptr, part_sum_ptr,  # (B, H, num_splits) fp32 running max (log2 domain) and sum
    query_ptr,                   # (T, H, D); decode b's token is row b
    kv_cache_ptr,                # (2, num_blocks, PAGE_SIZE, Hkv, D)
    block_tables_ptr, seq_lens_ptr,
    qk_scale, window, group,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv, stride_kb, stride_ks, stride_kh, stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, DOT_FP32: tl.constexpr, DIRECT_OUTPUT: tl.constexpr,
):
    seq = tl.program_id(0)
    group_blocks = tl.cdiv(group, BLOCK_G)                # programs per KV head
    kv_head = tl.program_id(1) // group_blocks
    first_row = (tl.program_id(1) % group_blocks) * BLOCK_G
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    first_key = tl.maximum(seq_len - window, 0)           # query sits at seq_len - 1
    first_tile = first_key // BLOCK_N
    num_tiles = tl.cdiv(seq_len, BLOCK_N)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    rows = first_row + offs_g                              # (BLOCK_G,) rows of the GQA group
    heads = kv_head * group + rows                         # their query heads
    g_mask = rows < group
    d_mask = offs_d < HEAD_DIM
    # A cache of another dtype is cast on load. DOT_FP32 only serves Triton's CPU
    # interpreter, whose tl.dot cannot multiply bf16; compiled kernels never set it.
    dot_type = tl.float32 if DOT_FP32 else query_ptr.dtype.element_ty
    q = tl.load(query_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(dot_type)  # (BLOCK_G, BLOCK_D)

    # Finite start: a tile whose keys are all masked then adds exp2(-inf) = 0, never NaN.
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(first_tile + split, num_tiles, num_splits):   # this split's tiles
        pos = tile * BLOCK_N + offs_n                      # (BLOCK_N,) key positions
        valid = (pos < seq_len) & (pos >= first_key)
        acc, m_i, l_i = attend_key_tile(q, acc, m_i, l_i, kv_cache_ptr, table, pos, valid,
                                        valid[None, :], kv_head, offs_d, d_mask, qk_scale,
                                        stride_kv, stride_kb, stride_ks, stride_kh, PAGE_SIZE)

    if DIRECT_OUTPUT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        num_heads = (tl.num_programs(1) // group_blocks) * group
        part = (seq.to(tl.int64) * num_heads + heads) * num_splits + split    # (BLOCK_G,)
        tl.store(part_max_ptr + part, m_i, mask=g_mask)
        tl.store(part_sum_ptr + part, l_i, mask=g_mask)
        tl.store(part_out_ptr + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def paged_decode_reduce_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    part = (seq * tl.num_programs(1) + head) * num_splits + offs_s             # (BLOCK_S,)
    m = tl.load(part_max_ptr + part, mask=s_mask, other=-1.0e30)
    weights = tl.where(s_mask, tl.exp2(m - tl.max(m, axis=0)), 0.0)             # empty splits -> 0
    total = tl.sum(weights * tl.load(part_sum_ptr + part, mask=s_mask, other=0.0), axis=0)
    acc = tl.load(part_out_ptr + part[:, None] * BLOCK_D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    out = tl.sum(acc * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)   # (BLOCK_D,)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def paged_decode_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, window: int,
                           num_splits: int | None = None) -> None:
    """Attention of the batch's first ``meta.num_decodes`` tokens (one per sequence) into out.

    query, out: (T, H, D); ``window`` in tokens (a huge value when there is none).
    ``num_splits`` forces a split count (tests); by default :func:`plan_splits` picks it.
    """
    num_decodes = meta.num_decodes
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    config = decode_config(head_dim, triton_dtype(query.dtype), device_arch(query.device))
    head_programs = num_kv_heads * cdiv(group, config.block_m)
    if num_splits is None:
        splits = plan_splits(num_decodes, head_programs, max(meta.seq_lens_cpu[:num_decodes]))
    elif 1 <= num_splits <= MAX_SPLITS:
        splits = num_splits
    else:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    block_d = next_power_of_2(head_dim)
    if splits > 1:
        part_out = torch.empty((num_decodes, num_heads, splits, block_d), dtype=torch.float32,
                               device=query.device)
        part_max = torch.empty((num_decodes, num_heads, splits), dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
    else:   # unused by the kernel when DIRECT_OUTPUT; fp32 keeps the compiled signature one
        part_out = part_max = part_sum = torch.empty(1, dtype=torch.float32, device=query.device)
    launch(paged_decode_kernel, (num_decodes, head_programs, splits),
           out, part_out, part_max, part_sum, query, kv_cache, meta.block_tables, meta.seq_lens,
           scale * math.log2(math.e), window, group,
           query.stride(0), query.stride(1), out.stride(0), out.stride(1),
           kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
           meta.block_tables.stride(0),
           HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_G=config.block_m, BLOCK_N=config.block_n,
           PAGE_SIZE=kv_cache.shape[2], DIRECT_OUTPUT=splits == 1,
           DOT_FP32=interpreting_bf16(query),
           num_warps=config.num_warps, num_stages=config.num_stages)
    if splits > 1:
        launch(paged_decode_reduce_kernel, (num_decodes, num_heads),
               out, part_out, part_max, part_sum, splits, out.stride(0), out.stride(1),
               HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=MAX_SPLITS, num_warps=4)


def aot_variants(dtype: str, arch: str) -> list[KernelVariant]:
    """Decode kernel per head dim and output mode (direct / split-K), any GQA group."""
    variants = []
    types = {"out_ptr": f"*{dtype}", "part_out_ptr": "*fp32", "part_max_ptr": "*fp32",
             "part_sum_ptr": "*fp32", "query_ptr": f"*{dtype}", "kv_cache_ptr": f"*{dtype}",
             "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "qk_scale": "fp32",
             "window": "i32", "group": "i32"}
    for head_dim in AOT_HEAD_DIMS:
        config = decode_config(head_dim, dtype, arch)
        for direct in (True, False):
            constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": next_power_of_2(head_dim),
                          "BLOCK_G": config.block_m, "BLOCK_N": config.block_n,
                          "PAGE_SIZE": AOT_PAGE_SIZE, "DIRECT_OUTPUT": direct, "DOT_FP32": False}
            label = (f"D={head_dim} G={config.block_m} N={config.block_n} w={config.num_warps} "
                     f"s={config.num_stages} {'direct' if direct else 'split-K'}")
            variants.append(KernelVariant(paged_decode_kernel, types, constexprs, config.num_warps,
                                          config.num_stages, label, dtype, unaligned=("stride_bt",),
                                          head_dim=head_dim))
    return variants + fp8_cache_variants(variants, dtype, arch)


def aot_reduce_variants(dtype: str, arch: str) -> list[KernelVariant]:
    """The split-K merge kernel per head dim, for up to MAX_SPLITS partitions."""
    types = {"out_ptr": f"*{dtype}", "part_out_ptr": "*fp32", "part_max_ptr": "*fp32",
             "part_sum_ptr": "*fp32", "num_splits": "i32"}
    return [KernelVariant(paged_decode_reduce_kernel, types,
                          {"HEAD_DIM": d, "BLOCK_D": next_power_of_2(d), "BLOCK_S": MAX_SPLITS},
                          num_warps=4, config=f"D={d} S<={MAX_SPLITS}", dtype=dtype, head_dim=d)
            for d in AOT_HEAD_DIMS]
