"""Triton twin of ``reference.apply_rotary``: neox-style rotary embedding (rotate_half)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ferry.kernels.triton._common import (
    AOT_HEAD_DIMS, KernelVariant, cdiv, check_same_device, launch, last_dim_contiguous,
    next_power_of_2,
)

# Heads rotated per program: enough work per program without many idle lanes.
HEADS_PER_PROGRAM = 4


@triton.jit
def rotary_kernel(
    out_ptr, x_ptr,               # (T, heads, D); out contiguous, x last dim contiguous
    positions_ptr,                # (T,) int64
    cos_sin_ptr,                  # (max_pos, D) = cat(cos, sin), each D/2
    num_heads,
    stride_ot, stride_oh, stride_xt, stride_xh, stride_cache,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_f = tl.arange(0, BLOCK_HALF)
    f_mask = offs_f < HALF
    mask = (offs_h[:, None] < num_heads) & f_mask[None, :]                  # (BLOCK_H, BLOCK_HALF)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_sin_ptr + position * stride_cache + offs_f, mask=f_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + position * stride_cache + HALF + offs_f, mask=f_mask, other=0.0)
    # The reference rotates in x's dtype with cos/sin cast to it: round them the same way.
    cos = cos.to(x_ptr.dtype.element_ty).to(tl.float32)[None, :]
    sin = sin.to(x_ptr.dtype.element_ty).to(tl.float32)[None, :]
    x_first = x_ptr + token * stride_xt + offs_h[:, None] * stride_xh + offs_f[None, :]
    x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)              # (BLOCK_H, BLOCK_HALF)
    x2 = tl.load(x_first + HALF, mask=mask, other=0.0).to(tl.float32)
    out_first = out_ptr + token * stride_ot + offs_h[:, None] * stride_oh + offs_f[None, :]
    out_type = out_ptr.dtype.element_ty
    tl.store(out_first, (x1 * cos - x2 * sin).to(out_type), mask=mask)
    tl.store(out_first + HALF, (x2 * cos + x1 * sin).to(out_type), mask=mask)


def apply_rotary(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding, returning new tensors (computed in float32).

    query (T, H, D), key (T, Hkv, D), positions (T,) int64,
    cos_sin_cache (max_pos, D) = cat(cos, sin), each of D/2 frequencies.
    """
    _check_args(query, key, positions, cos_sin_cache)
    cache = last_dim_contiguous(cos_sin_cache)
    return _rotate(query, positions, cache), _rotate(key, positions, cache)


def _rotate(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    x = last_dim_contiguous(x)
    num_tokens, num_heads, head_dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        half = head_dim // 2
        launch(rotary_kernel, (num_tokens, cdiv(num_heads, HEADS_PER_PROGRAM)),
               out, x, positions, cache, num_heads,
               out.stride(0), out.stride(1), x.stride(0), x.stride(1), cache.stride(0),
               HALF=half, BLOCK_HALF=next_power_of_2(half), BLOCK_H=HEADS_PER_PROGRAM, num_warps=1)
    return out


def _check_args(query, key, positions, cos_sin_cache) -> None:
    if query.dim() != 3 or key.dim() != 3 or query.shape[-1] != key.shape[-1] \
            or query.shape[0] != key.shape[0]:
        raise ValueError(f"query and key must be (T, H, D) and (T, Hkv, D), got "
                         f"{tuple(query.shape)} and {tuple(key.shape)}")
    head_dim = query.shape[-1]
    if head_dim % 2 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(f"cos_sin_cache must be (max_pos, {head_dim}) for an even head dim "
                         f"{head_dim} (partial rotary is not supported), got {tuple(cos_sin_cache.shape)}")
    if positions.shape != (query.shape[0],) or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"positions must be an integer tensor of shape ({query.shape[0]},), got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    check_same_device(query, key, positions, cos_sin_cache)


def aot_variants(dtype: str, arch: str) -> list[KernelVariant]:
    variants = []
    for head_dim in AOT_HEAD_DIMS:
        half = head_dim // 2
        types = {"out_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "positions_ptr": "*i64",
                 "cos_sin_ptr": "*fp32", "num_heads": "i32"}
        constexprs = {"HALF": half, "BLOCK_HALF": next_power_of_2(half), "BLOCK_H": HEADS_PER_PROGRAM}
        variants.append(KernelVariant(rotary_kernel, types, constexprs, num_warps=1,
                                      config=f"D={head_dim}", dtype=dtype, head_dim=head_dim))
    return variants
