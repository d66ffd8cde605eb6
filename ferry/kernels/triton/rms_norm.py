"""Triton twin of ``reference.rms_norm``: ``weight * (x / rms(x)).to(x.dtype)`` per row.

Also holds the row-block configuration shared with ``fused_add_rms_norm``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ferry.kernels.triton._common import KernelVariant, check_same_device, launch


@dataclass(frozen=True)
class RowConfig:
    """Columns per step and warps for a row-wise kernel over rows of ``hidden`` columns."""

    block: int
    num_warps: int


# The configurations the dispatcher chooses from (AOT-compiled); rows wider than the last
# block are walked in several steps.
ROW_CONFIGS = (RowConfig(256, 1), RowConfig(1024, 4), RowConfig(4096, 8), RowConfig(8192, 16))


def select_row_config(hidden: int) -> RowConfig:
    """Smallest block that holds the whole row (one pass over memory), else the largest."""
    for config in ROW_CONFIGS:
        if hidden <= config.block:
            return config
    return ROW_CONFIGS[-1]


@triton.jit
def rms_norm_kernel(
    out_ptr, x_ptr, weight_ptr,      # out, x: (rows, N) last dim contiguous; weight (N,)
    stride_out, stride_x,
    n_cols, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    offs = tl.arange(0, BLOCK)
    if n_cols <= BLOCK:
        # Whole row in registers: read x once.
        mask = offs < n_cols
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        weight = tl.load(weight_ptr + offs, mask=mask)
        # Round the normalised value to x's dtype before the weight, as HF Llama does.
        normed = (x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_row + offs, (normed * weight.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = start + offs < n_cols
            x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
            sum_sq += x * x
        inv_rms = tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            mask = start + offs < n_cols
            x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
            weight = tl.load(weight_ptr + start + offs, mask=mask)
            normed = (x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
            tl.store(out_row + start + offs, (normed * weight.to(tl.float32)).to(out_ptr.dtype.element_ty),
                     mask=mask)


def check_norm_args(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """Shared input checks of the RMSNorm wrappers."""
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1] if x.dim() else '?'},) to "
                         f"normalise rows of x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_same_device(x, weight)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(…, N) -> (rows, N) with a contiguous last dim, as a view when possible."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), normalised in float32. x: (..., N) -> (..., N)."""
    check_norm_args(x, weight, eps)
    rows = as_rows(x)
    # Same dtype as the reference's ``weight * normed``: the promotion of the two.
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows.numel():
        config = select_row_config(rows.shape[1])
        launch(rms_norm_kernel, (rows.shape[0],), out, rows, weight,
               out.stride(0), rows.stride(0), rows.shape[1], float(eps),
               BLOCK=config.block, num_warps=config.num_warps)
    return out.view(x.shape)


def aot_variants(dtype: str, arch: str) -> list[KernelVariant]:
    types = {"out_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}",
             "n_cols": "i32", "eps": "fp32"}
    return [KernelVariant(rms_norm_kernel, types, {"BLOCK": c.block}, num_warps=c.num_warps,
                          config=f"BLOCK={c.block}", dtype=dtype) for c in ROW_CONFIGS]
