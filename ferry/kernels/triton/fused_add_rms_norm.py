"""Triton twin of ``reference.fused_add_rms_norm``: residual add and RMSNorm in one pass."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ferry.kernels.triton._common import KernelVariant, check_same_device, launch
from ferry.kernels.triton.rms_norm import ROW_CONFIGS, as_rows, check_norm_args, select_row_config


@triton.jit
def fused_add_rms_norm_kernel(
    out_ptr, sum_ptr,                # (rows, N) outputs: normed(x + residual), x + residual
    x_ptr, residual_ptr, weight_ptr,
    stride_out, stride_sum, stride_x, stride_res,
    n_cols, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    sum_type = sum_ptr.dtype.element_ty
    if n_cols <= BLOCK:
        mask = offs < n_cols
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        res = tl.load(residual_ptr + row * stride_res + offs, mask=mask, other=0.0)
        # The sum is rounded to its dtype first and normalised from there (as x + residual).
        summed = (x.to(tl.float32) + res.to(tl.float32)).to(sum_type)
        tl.store(sum_ptr + row * stride_sum + offs, summed, mask=mask)
        s = summed.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(s * s, axis=0) / n_cols + eps)
        weight = tl.load(weight_ptr + offs, mask=mask).to(tl.float32)
        normed = (s * inv_rms).to(sum_type).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = start + offs < n_cols
            x = tl.load(x_ptr + row * stride_x + start + offs, mask=mask, other=0.0)
            res = tl.load(residual_ptr + row * stride_res + start + offs, mask=mask, other=0.0)
            summed = (x.to(tl.float32) + res.to(tl.float32)).to(sum_type)
            tl.store(sum_ptr + row * stride_sum + start + offs, summed, mask=mask)
            s = summed.to(tl.float32)
            sum_sq += s * s
        inv_rms = tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
        # NOTE: the loop below reads back what this program stored above; the barrier makes
        # those global writes visible across the program's threads.
        tl.debug_barrier()
        for start in range(0, n_cols, BLOCK):
            mask = start + offs < n_cols
            s = tl.load(sum_ptr + row * stride_sum + start + offs, mask=mask, other=0.0).to(tl.float32)
            weight = tl.load(weight_ptr + start + offs, mask=mask).to(tl.float32)
            normed = (s * inv_rms).to(sum_type).to(tl.float32)
            out = (normed * weight).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + row * stride_out + start + offs, out, mask=mask)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: returns (rms_norm(x + residual), x + residual), new tensors."""
    check_norm_args(x, weight, eps)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_same_device(x, residual)
    x_rows, res_rows = as_rows(x), as_rows(residual)
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    summed = torch.empty(x_rows.shape, dtype=sum_dtype, device=x.device)
    out = torch.empty(x_rows.shape, dtype=torch.promote_types(sum_dtype, weight.dtype), device=x.device)
    if x_rows.numel():
        config = select_row_config(x_rows.shape[1])
        launch(fused_add_rms_norm_kernel, (x_rows.shape[0],), out, summed, x_rows, res_rows, weight,
               out.stride(0), summed.stride(0), x_rows.stride(0), res_rows.stride(0),
               x_rows.shape[1], float(eps), BLOCK=config.block, num_warps=config.num_warps)
    return out.view(x.shape), summed.view(x.shape)


def aot_variants(dtype: str, arch: str) -> list[KernelVariant]:
    types = {name: f"*{dtype}" for name in ("out_ptr", "sum_ptr", "x_ptr", "residual_ptr", "weight_ptr")}
    types.update(n_cols="i32", eps="fp32")
    return [KernelVariant(fused_add_rms_norm_kernel, types, {"BLOCK": c.block}, num_warps=c.num_warps,
                          config=f"BLOCK={c.block}", dtype=dtype) for c in ROW_CONFIGS]
