"""Triton twin of ``quant_reference.wna16_linear``: w4a16 / w8a16 group-wise dequant-GEMM.

Decode-sized inputs (up to ``MAX_FUSED_ROWS`` tokens) run one fused kernel: each program
owns a (BLOCK_M, BLOCK_N) output tile and walks K in BLOCK_K steps, loading the packed
codes (1 or 0.5 bytes per weight), dequantizing them in registers with the tile's
group scale and zero, and accumulating ``x @ w^T`` in float32 with ``tl.dot``. BLOCK_K
divides the group size, so each step needs one scale and zero per output row. Larger
prefills dequantize the weight once and run the vendor GEMM, which is faster when the
multiply, not the weight read, is the cost.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ferry.kernels import quant_reference
from ferry.kernels.triton._common import KernelVariant, cdiv, interpreting_bf16, launch

MAX_FUSED_ROWS = 64
# (BLOCK_M, BLOCK_N, num_warps) by token count: decode batches take the small M tile.
WNA16_CONFIGS = ((16, 64, 4), (32, 64, 4), (64, 64, 4))
# 32 at most: at BLOCK_K = 128 the int4 unpack spilled hundreds of registers on every
# target in the AOT matrix; 32 compiled without spills (except fp32 at M = 64 on gfx1100).
BLOCK_K_CHOICES = (32, 16)


@triton.jit
def wna16_gemm_kernel(
    out_ptr, x_ptr, q_ptr, scales_ptr, zeros_ptr, bias_ptr,
    M, N, K, group_size,
    stride_out, stride_x, stride_q, stride_s,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                   # (BM,)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                   # (BN,) output features
    row_mask = rows < M
    col_mask = cols < N
    offs_k = tl.arange(0, BLOCK_K)                                   # (BK,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :],
                    mask=row_mask[:, None], other=0.0)               # (BM, BK)
        if BITS == 8:
            q = tl.load(q_ptr + cols[:, None].to(tl.int64) * stride_q + ks[None, :],
                        mask=col_mask[:, None], other=0)             # (BN, BK) uint8
            codes = q.to(tl.int32)
        else:
            # two neighbouring k share a byte: low nibble = even k, high = odd k
            q = tl.load(q_ptr + cols[:, None].to(tl.int64) * stride_q + (ks // 2)[None, :],
                        mask=col_mask[:, None], other=0)             # (BN, BK) uint8
            codes = (q.to(tl.int32) >> ((ks % 2) * 4)[None, :]) & 15
        group = k0 // group_size
        scale = tl.load(scales_ptr + cols.to(tl.int64) * stride_s + group, mask=col_mask, other=0.0)
        zero = tl.load(zeros_ptr + cols.to(tl.int64) * stride_s + group, mask=col_mask, other=0.0)
        # (q - zero) * scale, rounded to the activation dtype like the reference's weight
        w = ((codes.to(tl.float32) - zero.to(tl.float32)[:, None]).to(x.dtype).to(tl.float32)
             * scale.to(tl.float32)[:, None]).to(x.dtype)            # (BN, BK)
        acc += tl.dot(x, tl.trans(w), out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def select_config(rows: int) -> tuple[int, int, int]:
    for config in WNA16_CONFIGS:
        if rows <= config[0]:
            return config
    return WNA16_CONFIGS[-1]


def block_k_for(group_size: int) -> int | None:
    return next((b for b in BLOCK_K_CHOICES if group_size % b == 0), None)


def wna16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, bits: int, group_size: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    n, k = quant_reference.check_wna16_args(x, qweight, scales, zeros, bits, group_size)
    block_k = block_k_for(group_size)
    if (x.shape[0] > MAX_FUSED_ROWS or block_k is None or interpreting_bf16(x)
            or scales.dtype != x.dtype or zeros.dtype != x.dtype):
        # prefill (or a group size no BLOCK_K divides): dequantize once, vendor GEMM
        weight = quant_reference.dequantize_wna16(qweight, scales, zeros, bits, group_size)
        return F.linear(x, weight.to(x.dtype), bias)
    x = x if x.stride(-1) == 1 else x.contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_m, block_n, warps = select_config(x.shape[0])
    launch(wna16_gemm_kernel, (cdiv(x.shape[0], block_m), cdiv(n, block_n)),
           out, x, qweight, scales, zeros, bias if bias is not None else out,
           x.shape[0], n, k, group_size,
           out.stride(0), x.stride(0), qweight.stride(0), scales.stride(0),
           BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
           BLOCK_K=block_k, num_warps=warps)
    return out


def aot_variants(dtype: str, arch: str) -> list[KernelVariant]:
    """Every (bits, tile) the dispatcher launches at BLOCK_K = 32 (group sizes that are
    multiples of 32), with and without bias."""
    types = {"out_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "q_ptr": "*u8",
             "scales_ptr": f"*{dtype}", "zeros_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
             "M": "i32", "N": "i32", "K": "i32", "group_size": "i32"}
    variants = []
    for bits in (4, 8):
        for block_m, block_n, warps in WNA16_CONFIGS:
            for has_bias in (False, True):
                constexprs = {"BITS": bits, "HAS_BIAS": has_bias, "BLOCK_M": block_m,
                              "BLOCK_N": block_n, "BLOCK_K": 32}
                variants.append(KernelVariant(
                    wna16_gemm_kernel, types, constexprs, num_warps=warps, dtype=dtype,
                    config=f"w{bits} BM={block_m} BN={block_n} BK=32{' bias' if has_bias else ''}"))
    return variants
