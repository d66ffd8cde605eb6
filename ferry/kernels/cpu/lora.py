"""Segmented LoRA shrink/expand through the C++ kernels (``csrc/lora.cpp``).

Same signatures and semantics as ``ferry.kernels.lora_reference``; falls back to it for
what the C++ side does not take (dtypes other than float32/bfloat16, mixed dtypes, rows
that are not contiguous).
"""
from __future__ import annotations

import torch

from ferry.kernels import lora_reference as reference
from ferry.kernels.cpu._lib import DTYPE_CODES, check, functions
from ferry.kernels.lora_metadata import LoRAMapping


def _rows_ok(t: torch.Tensor) -> bool:
    return t.is_cpu and t.stride(-1) == 1


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, mapping: LoRAMapping) -> torch.Tensor:
    if (functions() is None or x.dtype not in DTYPE_CODES or lora_a.dtype != x.dtype
            or x.dim() != 2 or not _rows_ok(x) or not _rows_ok(lora_a)):
        return reference.lora_shrink(x, lora_a, mapping)
    tokens, rank, width = x.shape[0], lora_a.shape[1], x.shape[1]
    v = torch.zeros((tokens, rank), dtype=torch.float32)
    slots = mapping.token_slots
    check(functions().lora_shrink(
        DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), lora_a.data_ptr(), lora_a.stride(0),
        lora_a.stride(1), slots.data_ptr(), tokens, rank, width, v.data_ptr(),
        torch.get_num_threads()), "lora_shrink")
    return v


def lora_expand(v: torch.Tensor, lora_b: torch.Tensor, y: torch.Tensor,
                mapping: LoRAMapping) -> None:
    if (functions() is None or y.dtype not in DTYPE_CODES or lora_b.dtype != y.dtype
            or v.dtype != torch.float32 or not v.is_contiguous() or y.dim() != 2
            or not _rows_ok(y) or not _rows_ok(lora_b)):
        return reference.lora_expand(v, lora_b, y, mapping)
    tokens, rank, out = y.shape[0], lora_b.shape[1], y.shape[1]
    check(functions().lora_expand(
        DTYPE_CODES[y.dtype], v.data_ptr(), lora_b.data_ptr(), lora_b.stride(0),
        lora_b.stride(1), mapping.token_slots.data_ptr(), tokens, rank, out, y.data_ptr(),
        y.stride(0), torch.get_num_threads()), "lora_expand")
