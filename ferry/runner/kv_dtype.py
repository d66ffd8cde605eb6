"""The run-time KV cache dtype from the ``kv_cache_dtype`` key and the checkpoint.

``fp8`` stores keys and values as float8 e4m3 (``torch.float8_e4m3fn``), each divided by
its layer's ``k_scale`` / ``v_scale`` (1.0 unless the checkpoint gives them): half the
bytes of a 16-bit cache, so about twice the blocks in the same memory. ``auto`` is the
model dtype, or fp8 when the checkpoint's ``quantization_config`` declares an FP8 KV
cache (its scales were calibrated for it). A value set explicitly wins.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from ferry.checkpoint import checkpoint_has_fp8_kv_cache

logger = logging.getLogger(__name__)

FP8_KV_DTYPE = torch.float8_e4m3fn


def resolve_kv_cache_dtype(name: str, hf_config: Any, model_dtype: torch.dtype,
                           device: torch.device | None = None) -> torch.dtype:
    """``name`` is the config value ("auto" or "fp8"). On a GPU without float8 e4m3
    (before sm_89, MI250, RDNA3: Triton has no such type there) fp8 is refused."""
    if name == "fp8":
        _check_device(device)
        return FP8_KV_DTYPE
    if name != "auto":
        raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {name!r}")
    if checkpoint_has_fp8_kv_cache(hf_config):
        _check_device(device)
        logger.info("kv_cache_dtype auto: the checkpoint declares an FP8 KV cache, using fp8 (e4m3)")
        return FP8_KV_DTYPE
    return model_dtype


def _check_device(device: torch.device | None) -> None:
    from ferry.platform import has_fp8_matmul
    if device is not None and device.type == "cuda" and not has_fp8_matmul(device):
        raise ValueError("kv_cache_dtype=fp8 needs a GPU with float8 e4m3 (NVIDIA sm_89+ or "
                         "AMD MI300); this one has none: use kv_cache_dtype=auto")
