"""RMSNorm, rotary, SiLU-and-mul and the KV write through the C++ kernels
(``csrc/elementwise.cpp``).

Each function has the signature and semantics of its namesake in
``ferry.kernels.reference`` and falls back to it for what the C++ side does not take: a
dtype other than float32/bfloat16, mixed dtypes, mismatched shapes, or (except for
``rms_norm``, which copies such input first) rows that are not uniformly strided.
"""
from __future__ import annotations

import torch

from ferry.kernels import reference
from ferry.kernels.cpu._lib import (DTYPE_CODES, FP8_CACHE_DTYPE, check, functions, heads_layout,
                                    row_layout)


def _usable(*tensors: torch.Tensor) -> bool:
    """The kernels are built and take these tensors: CPU, one dtype they handle."""
    dtype = tensors[0].dtype
    if dtype not in DTYPE_CODES or functions() is None:
        return False
    for t in tensors:
        if t.dtype != dtype or not t.is_cpu:
            return False
    return True


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor of x's shape and dtype (``empty_like`` is the cheap call)."""
    return torch.empty_like(x) if x.is_contiguous() else torch.empty(x.shape, dtype=x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not _usable(x, weight) or not weight.is_contiguous() or weight.shape != x.shape[-1:]:
        return reference.rms_norm(x, weight, eps)
    layout = row_layout(x)
    if layout is None:   # e.g. Qwen3's q/k norm over (T, H, D) views of qkv: one copy is cheaper
        x = x.contiguous()
        layout = row_layout(x)
    rows, width, stride = layout
    out = _empty_like(x)
    check(functions().rms_norm(DTYPE_CODES[x.dtype], x.data_ptr(), stride, weight.data_ptr(), eps,
                               rows, width, out.data_ptr(), torch.get_num_threads()), "rms_norm")
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x_layout, r_layout = row_layout(x), row_layout(residual)
    if (not _usable(x, residual, weight) or x_layout is None or r_layout is None
            or x.shape != residual.shape or not weight.is_contiguous()
            or weight.shape != x.shape[-1:]):
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    rows, width, x_stride = x_layout
    normed, summed = _empty_like(x), _empty_like(x)
    check(functions().fused_add_rms_norm(
        DTYPE_CODES[x.dtype], x.data_ptr(), x_stride, residual.data_ptr(), r_layout[2],
        weight.data_ptr(), eps, rows, width, normed.data_ptr(), summed.data_ptr(),
        torch.get_num_threads()), "fused_add_rms_norm")
    return normed, summed


def apply_rotary(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q_stride, k_stride = heads_layout(query), heads_layout(key)
    if (not _usable(query, key) or q_stride is None or k_stride is None
            or cos_sin_cache.dtype != torch.float32 or not cos_sin_cache.is_contiguous()
            or query.shape[2] != cos_sin_cache.shape[1] or key.shape[2] != query.shape[2]
            or key.shape[0] != query.shape[0] or positions.shape != query.shape[:1]):
        return reference.apply_rotary(query, key, positions, cos_sin_cache)
    tokens, heads, dim = query.shape
    positions = positions.to(torch.int64).contiguous()
    if tokens and (int(positions.min()) < 0 or int(positions.max()) >= cos_sin_cache.shape[0]):
        raise IndexError(f"positions must lie in [0, {cos_sin_cache.shape[0]})")
    q_out = torch.empty((tokens, heads, dim), dtype=query.dtype)
    k_out = torch.empty((tokens, key.shape[1], dim), dtype=key.dtype)
    check(functions().apply_rotary(
        DTYPE_CODES[query.dtype], query.data_ptr(), q_stride, key.data_ptr(), k_stride,
        positions.data_ptr(), cos_sin_cache.data_ptr(), tokens, heads, key.shape[1], dim,
        q_out.data_ptr(), k_out.data_ptr(), torch.get_num_threads()), "apply_rotary")
    return q_out, k_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    layout = row_layout(x)
    if not _usable(x) or layout is None or x.shape[-1] % 2:
        return reference.silu_and_mul(x)
    rows, width, stride = layout
    out = torch.empty((*x.shape[:-1], width // 2), dtype=x.dtype)
    check(functions().silu_and_mul(DTYPE_CODES[x.dtype], x.data_ptr(), stride, rows, width // 2,
                                   out.data_ptr(), torch.get_num_threads()), "silu_and_mul")
    return out


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """NOTE: slots are trusted to lie inside the cache (the runner derives them from the
    block tables it was given); the reference would raise on a bad one, this would not."""
    k_stride, v_stride = heads_layout(key), heads_layout(value)
    if kv_cache.dtype == FP8_CACHE_DTYPE:
        return _write_kv_cache_fp8(key, value, kv_cache, slot_mapping, k_stride, v_stride)
    if (not _usable(key, value, kv_cache) or k_stride is None or v_stride is None
            or not kv_cache.is_contiguous() or key.shape != value.shape
            or key.shape[1:] != kv_cache.shape[3:] or slot_mapping.shape != key.shape[:1]):
        return reference.write_kv_cache(key, value, kv_cache, slot_mapping)
    slots = slot_mapping.to(torch.int64).contiguous()
    width = key.shape[1] * key.shape[2]
    check(functions().write_kv_cache(
        DTYPE_CODES[key.dtype], key.data_ptr(), k_stride, value.data_ptr(), v_stride,
        slots.data_ptr(), key.shape[0], width, kv_cache[0].data_ptr(), kv_cache[1].data_ptr()),
        "write_kv_cache")


def _write_kv_cache_fp8(key, value, kv_cache, slot_mapping, k_stride, v_stride) -> None:
    """Into an FP8 cache: saturating round-to-nearest-even (``csrc/kv_fp8.cpp``)."""
    if (not _usable(key, value) or k_stride is None or v_stride is None
            or not kv_cache.is_contiguous() or key.shape != value.shape
            or key.shape[1:] != kv_cache.shape[3:] or slot_mapping.shape != key.shape[:1]):
        return reference.write_kv_cache(key, value, kv_cache, slot_mapping)
    slots = slot_mapping.to(torch.int64).contiguous()
    check(functions().write_kv_cache_fp8(
        DTYPE_CODES[key.dtype], key.data_ptr(), k_stride, value.data_ptr(), v_stride,
        slots.data_ptr(), key.shape[0], key.shape[1] * key.shape[2], kv_cache[0].data_ptr(),
        kv_cache[1].data_ptr()), "write_kv_cache")
