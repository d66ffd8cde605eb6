"""The single dispatch point for compute kernels.

Layers call ops through this module (``from ferry import kernels; kernels.rms_norm(...)``),
never a backend directly, so the backend is chosen in one place:

- tensors on a CUDA or ROCm device, when Triton imports: the Triton kernels
  (``ferry/kernels/triton/``);
- CPU tensors, when the C++ kernels build (a compiler is present and
  ``FERRY_CPU_KERNELS`` is not 0): ``ferry/kernels/cpu/``;
- otherwise the PyTorch reference (``ferry/kernels/reference.py``).

All three have the same signatures and semantics; the reference is the oracle the other
two are tested against, and the fallback wherever they cannot run.
"""
from __future__ import annotations

import functools

import torch

from ferry.kernels import reference
from ferry.platform import triton_importable


# The ops every backend implements (the tests reroute them all to one backend).
OP_NAMES = ("write_kv_cache", "paged_attention", "rms_norm", "fused_add_rms_norm",
            "apply_rotary", "silu_and_mul")


@functools.cache
def _triton_ops():
    """ferry.kernels.triton, imported on the first GPU call: importing it imports triton,
    and the CPU tests must be able to set TRITON_INTERPRET before that happens."""
    if not triton_importable():
        return None
    import ferry.kernels.triton as triton_ops
    return triton_ops


@functools.cache
def _cpu_ops():
    import ferry.kernels.cpu as cpu_ops
    return cpu_ops if cpu_ops.available() else None


def _ops_for(tensor: torch.Tensor):
    if tensor.is_cuda and (ops := _triton_ops()) is not None:  # ROCm tensors are "cuda" too
        return ops
    if tensor.device.type == "cpu" and (ops := _cpu_ops()) is not None:
        return ops
    return reference


def prepare(device: torch.device) -> str:
    """Load (and on the CPU, build) the backend for ``device`` now rather than on the first
    request; returns its name: "triton", "cpu" (C++) or "reference"."""
    if device.type == "cuda" and _triton_ops() is not None:
        return "triton"
    if device.type == "cpu" and _cpu_ops() is not None:
        return "cpu"
    return "reference"


def write_kv_cache(key, value, kv_cache, slot_mapping) -> None:
    return _ops_for(key).write_kv_cache(key, value, kv_cache, slot_mapping)


def paged_attention(query, kv_cache, meta, scale, sliding_window=None):
    return _ops_for(query).paged_attention(query, kv_cache, meta, scale, sliding_window)


def rms_norm(x, weight, eps):
    return _ops_for(x).rms_norm(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps):
    return _ops_for(x).fused_add_rms_norm(x, residual, weight, eps)


def apply_rotary(query, key, positions, cos_sin_cache):
    return _ops_for(query).apply_rotary(query, key, positions, cos_sin_cache)


def silu_and_mul(x):
    return _ops_for(x).silu_and_mul(x)


__all__ = ["OP_NAMES", "apply_rotary", "fused_add_rms_norm", "paged_attention", "prepare",
           "rms_norm", "silu_and_mul", "write_kv_cache"]
