"""Triton twin of ``reference.write_kv_cache``: scatter new K/V rows into the paged cache."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ferry.kernels.triton._common import (
    AOT_HEAD_DIMS, AOT_PAGE_SIZE, KernelVariant, check_same_device, launch, last_dim_contiguous,
    next_power_of_2,
)
from ferry.kernels.triton.attention_fp8 import FP8_KV_TARGETS

FP8_MAX = 448.0   # largest finite float8 e4m3fn
_FP8_MAX = tl.constexpr(FP8_MAX)   # the same, readable inside @triton.jit


@triton.jit
def write_kv_cache_kernel(
    key_ptr, value_ptr,          # (T, Hkv, D), last dim contiguous
    kv_cache_ptr,                # (2, num_blocks, page_size, Hkv, D)
    slot_mapping_ptr,            # (T,) int64; < 0 means padding
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_kv, stride_cache_block, stride_cache_slot, stride_cache_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    SATURATE: tl.constexpr = False,   # fp8 cache: clamp to +-FP8_MAX before the cast
):
    # One program copies one KV head of one token.
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    block = slot // PAGE_SIZE
    # int64: block * stride_cache_block overflows int32 in caches over 2^31 elements
    dest = block * stride_cache_block + (slot % PAGE_SIZE) * stride_cache_slot + head * stride_cache_head
    key = tl.load(key_ptr + token * stride_kt + head * stride_kh + offs_d, mask=d_mask)
    value = tl.load(value_ptr + token * stride_vt + head * stride_vh + offs_d, mask=d_mask)
    cache_type = kv_cache_ptr.dtype.element_ty
    if SATURATE:   # an out-of-range cast to fp8 is NaN on some targets
        key = tl.minimum(tl.maximum(key.to(tl.float32), -_FP8_MAX), _FP8_MAX)
        value = tl.minimum(tl.maximum(value.to(tl.float32), -_FP8_MAX), _FP8_MAX)
    tl.store(kv_cache_ptr + dest + offs_d, key.to(cache_type), mask=d_mask)
    tl.store(kv_cache_ptr + stride_cache_kv + dest + offs_d, value.to(cache_type), mask=d_mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values into the paged cache, in place.

    key, value: (T, Hkv, D); kv_cache: (2, num_blocks, block_size, Hkv, D);
    slot_mapping: (T,) int64, ``block_id * block_size + offset``; slots < 0 are skipped.
    """
    _check_args(key, value, kv_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    key, value = last_dim_contiguous(key), last_dim_contiguous(value)
    saturate = kv_cache.dtype == torch.float8_e4m3fn and key.dtype != kv_cache.dtype
    if saturate and key.device.type == "cpu":
        # Triton's interpreter drops the carry when a value rounds up to the next power of
        # two in its float -> fp8 cast (1.99 -> 1.0): round with torch, then copy fp8 rows.
        key, value = _to_fp8(key), _to_fp8(value)
        saturate = False
    launch(write_kv_cache_kernel, (num_tokens, num_kv_heads),
           key, value, kv_cache, slot_mapping,
           key.stride(0), key.stride(1), value.stride(0), value.stride(1),
           kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
           HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), PAGE_SIZE=kv_cache.shape[2],
           SATURATE=saturate, num_warps=1)


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _check_args(key, value, kv_cache, slot_mapping) -> None:
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key and value must both be (T, Hkv, D), got {tuple(key.shape)} "
                         f"and {tuple(value.shape)}")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3:] != key.shape[1:]:
        raise ValueError(f"kv_cache must be (2, num_blocks, block_size, {key.shape[1]}, "
                         f"{key.shape[2]}), got {tuple(kv_cache.shape)}")
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache's last dim must be contiguous")
    if slot_mapping.shape != (key.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64 of shape ({key.shape[0]},), got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    check_same_device(key, value, kv_cache, slot_mapping)


def aot_variants(dtype: str, arch: str) -> list[KernelVariant]:
    """The compilations the wrapper can launch for activations (and cache) of ``dtype``."""
    types = {"key_ptr": f"*{dtype}", "value_ptr": f"*{dtype}", "kv_cache_ptr": f"*{dtype}",
             "slot_mapping_ptr": "*i64"}
    return [KernelVariant(write_kv_cache_kernel, types,
                          {"HEAD_DIM": d, "BLOCK_D": next_power_of_2(d), "PAGE_SIZE": AOT_PAGE_SIZE,
                           "SATURATE": False},
                          num_warps=1, config=f"D={d}", dtype=dtype, head_dim=d)
            for d in AOT_HEAD_DIMS] + _fp8_variants(dtype, arch)


def _fp8_variants(dtype: str, arch: str) -> list[KernelVariant]:
    """16-bit activations into an fp8 (e4m3) cache, with the saturating cast."""
    if dtype == "fp32" or arch not in FP8_KV_TARGETS:
        return []
    types = {"key_ptr": f"*{dtype}", "value_ptr": f"*{dtype}", "kv_cache_ptr": "*fp8e4nv",
             "slot_mapping_ptr": "*i64"}
    return [KernelVariant(write_kv_cache_kernel, types,
                          {"HEAD_DIM": d, "BLOCK_D": next_power_of_2(d), "PAGE_SIZE": AOT_PAGE_SIZE,
                           "SATURATE": True},
                          num_warps=1, config=f"D={d} kv=fp8", dtype=dtype, head_dim=d)
            for d in (128,)]
