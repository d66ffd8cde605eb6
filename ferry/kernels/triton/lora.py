"""Triton twins of ``lora_reference.lora_shrink`` / ``lora_expand`` (segmented, Punica-style).

One program per (segment, block of its tokens, block of output columns): every token of a
segment uses the same adapter slot, so its A or B tile is loaded once per program and
multiplied as a matrix (``tl.dot`` in float32, IEEE precision: no TF32 rounding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ferry.kernels.lora_metadata import LoRAMapping
from ferry.kernels.triton._common import KernelVariant, cdiv, check_same_device, launch

# (BLOCK_T, BLOCK_N, BLOCK_K): tokens, output columns, reduction per step. 16 is tl.dot's minimum.
SHRINK_CONFIG = (16, 16, 64)
EXPAND_CONFIG = (16, 64, 16)


@triton.jit
def lora_shrink_kernel(
    x_ptr, a_ptr, v_ptr, seg_ptr,       # x (T, in); a (S, r, in) view; v (T, r) fp32; seg (N, 3) i32
    rank, in_features, stride_x, stride_a_slot, stride_a_row, stride_v,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    seg = tl.program_id(0)
    start = tl.load(seg_ptr + seg * 3)
    end = tl.load(seg_ptr + seg * 3 + 1)
    slot = tl.load(seg_ptr + seg * 3 + 2).to(tl.int64)
    first = start + tl.program_id(1) * BLOCK_T
    if first < end:
        offs_t = (first + tl.arange(0, BLOCK_T)).to(tl.int64)
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        t_mask, n_mask = offs_t < end, offs_n < rank
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < in_features
            x = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_k[None, :],
                        mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            a = tl.load(a_ptr + slot * stride_a_slot + offs_n[:, None] * stride_a_row
                        + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.dot(x, tl.trans(a), input_precision="ieee")      # (BT, BN)
        tl.store(v_ptr + offs_t[:, None] * stride_v + offs_n[None, :], acc,
                 mask=t_mask[:, None] & n_mask[None, :])


@triton.jit
def lora_expand_kernel(
    v_ptr, b_ptr, y_ptr, seg_ptr,       # v (T, r) fp32; b = B^T (S, r, out) view; y (T, out) view
    rank, out_features, stride_v, stride_b_slot, stride_b_row, stride_y,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    seg = tl.program_id(0)
    start = tl.load(seg_ptr + seg * 3)
    end = tl.load(seg_ptr + seg * 3 + 1)
    slot = tl.load(seg_ptr + seg * 3 + 2).to(tl.int64)
    first = start + tl.program_id(1) * BLOCK_T
    if first < end:
        offs_t = (first + tl.arange(0, BLOCK_T)).to(tl.int64)
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        t_mask, n_mask = offs_t < end, offs_n < out_features
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, rank, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < rank
            v = tl.load(v_ptr + offs_t[:, None] * stride_v + offs_k[None, :],
                        mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptr + slot * stride_b_slot + offs_k[:, None] * stride_b_row
                        + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :],
                        other=0.0).to(tl.float32)                       # (BK, BN)
            acc += tl.dot(v, b, input_precision="ieee")                 # (BT, BN)
        y_ptrs = y_ptr + offs_t[:, None] * stride_y + offs_n[None, :]
        mask = t_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        raise ValueError(f"LoRA kernels need a contiguous last dim, got strides {t.stride()}")
    return t


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, mapping: LoRAMapping) -> torch.Tensor:
    """x (T, in), lora_a (S, r, in) -> v (T, r) float32 (zero outside the segments)."""
    check_same_device(x, lora_a, mapping.segment_table)
    x, lora_a = _rows(x), _rows(lora_a)
    rank, width = lora_a.shape[1], x.shape[1]
    v = torch.zeros((x.shape[0], rank), dtype=torch.float32, device=x.device)
    if mapping.segments and rank:
        bt, bn, bk = SHRINK_CONFIG
        grid = (len(mapping.segments), cdiv(mapping.max_segment_len, bt), cdiv(rank, bn))
        launch(lora_shrink_kernel, grid, x, lora_a, v, mapping.segment_table, rank, width,
               x.stride(0), lora_a.stride(0), lora_a.stride(1), v.stride(0),
               BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk)
    return v


def lora_expand(v: torch.Tensor, lora_b: torch.Tensor, y: torch.Tensor,
                mapping: LoRAMapping) -> None:
    """y (T, out) += v (T, r) @ lora_b[slot] (r, out) per segment, in place."""
    check_same_device(v, lora_b, y, mapping.segment_table)
    lora_b, y = _rows(lora_b), _rows(y)
    rank, out = lora_b.shape[1], y.shape[1]
    if mapping.segments and rank:
        bt, bn, bk = EXPAND_CONFIG
        grid = (len(mapping.segments), cdiv(mapping.max_segment_len, bt), cdiv(out, bn))
        launch(lora_expand_kernel, grid, v, lora_b, y, mapping.segment_table, rank, out,
               v.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
               BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk)


def aot_variants(dtype: str, arch: str) -> list[KernelVariant]:
    """One block configuration each; ranks and sliced views make row strides unaligned."""
    shrink = {"x_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "v_ptr": "*fp32", "seg_ptr": "*i32",
              "rank": "i32", "in_features": "i32"}
    expand = {"v_ptr": "*fp32", "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "seg_ptr": "*i32",
              "rank": "i32", "out_features": "i32"}
    names = ("BLOCK_T", "BLOCK_N", "BLOCK_K")
    return [
        KernelVariant(lora_shrink_kernel, shrink, dict(zip(names, SHRINK_CONFIG)),
                      config="T16xN16xK64", dtype=dtype, unaligned=("stride_v", "stride_a_row")),
        KernelVariant(lora_expand_kernel, expand, dict(zip(names, EXPAND_CONFIG)),
                      config="T16xN64xK16", dtype=dtype,
                      unaligned=("stride_v", "stride_b_row", "stride_y")),
    ]
