"""Triton twin of ``reference.silu_and_mul``: the SwiGLU gate silu(x[:, :I]) * x[:, I:]."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ferry.kernels.triton._common import KernelVariant, cdiv, launch

# (block, num_warps) choices: small intermediates take the small block.
SILU_CONFIGS = ((256, 2), (1024, 4))


def select_silu_config(inter: int) -> tuple[int, int]:
    return SILU_CONFIGS[0] if inter <= SILU_CONFIGS[0][0] else SILU_CONFIGS[1]


@triton.jit
def silu_and_mul_kernel(
    out_ptr, x_ptr,             # out (rows, I) contiguous; x (rows, 2I) last dim contiguous
    inter, stride_out, stride_x,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    # silu is rounded to x's dtype before the product, as the unfused F.silu(gate) * up.
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(…, 2I) -> silu(x[..., :I]) * x[..., I:], the SwiGLU gate."""
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim (2 * intermediate), got {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = torch.empty((rows.shape[0], inter), dtype=x.dtype, device=x.device)
    if out.numel():
        block, num_warps = select_silu_config(inter)
        launch(silu_and_mul_kernel, (rows.shape[0], cdiv(inter, block)), out, rows,
               inter, out.stride(0), rows.stride(0), BLOCK=block, num_warps=num_warps)
    return out.view(*x.shape[:-1], inter)


def aot_variants(dtype: str, arch: str) -> list[KernelVariant]:
    types = {"out_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "inter": "i32"}
    return [KernelVariant(silu_and_mul_kernel, types, {"BLOCK": block}, num_warps=warps,
                          config=f"BLOCK={block}", dtype=dtype) for block, warps in SILU_CONFIGS]
