"""The single dispatch point for compute kernels.

Layers call ops through this module (``from ferry import kernels; kernels.rms_norm(...)``),
never a backend directly, so the backend is chosen in one place. Which backend can run on a
device type is the platform's answer (``ferry.platform.kernel_backend``):

- "triton": tensors on a CUDA or ROCm device, when Triton imports (``ferry/kernels/triton/``);
- "cpu": CPU tensors, when the C++ kernels are enabled (``FERRY_CPU_KERNELS`` is not 0), a
  compiler is present and they build (``ferry/kernels/cpu/``);
- "reference": otherwise, the PyTorch reference (``ferry/kernels/reference.py``).

All three have the same signatures and semantics; the reference is the oracle the other
two are tested against, and the fallback wherever they cannot run.
"""
from __future__ import annotations

import logging
import os
from types import ModuleType

import torch

from ferry.kernels import attention_trace as _trace
from ferry.kernels import reference
from ferry.platform import kernel_backend

logger = logging.getLogger(__name__)

# The ops every backend implements (the tests reroute them all to one backend).
OP_NAMES = ("write_kv_cache", "paged_attention", "rms_norm", "fused_add_rms_norm",
            "apply_rotary", "silu_and_mul", "dense_linear", "wna16_linear", "bf16_weight_linear",
            "lora_shrink", "lora_expand", "apply_token_bitmask")

# device type -> backend module. Dispatch runs per op per layer per step: after the first
# call on a device type it is one dict lookup.
_ops_by_device_type: dict[str, ModuleType] = {}


def _ops_for(tensor: torch.Tensor) -> ModuleType:
    device_type = tensor.device.type
    ops = _ops_by_device_type.get(device_type)
    return ops if ops is not None else _load_ops(device_type)


def _load_ops(device_type: str) -> ModuleType:
    """Import the backend the platform names for ``device_type`` and remember it. Triton is
    imported here, on the first GPU call, not at import time: the CPU tests must be able to
    set TRITON_INTERPRET before that happens."""
    backend = kernel_backend(device_type)
    ops: ModuleType = reference
    if backend == "triton":
        import ferry.kernels.triton as ops
    elif backend == "cpu":
        import ferry.kernels.cpu as cpu_ops
        if cpu_ops.available():          # False when the build failed: the reference runs
            ops = cpu_ops
    _ops_by_device_type[device_type] = ops
    return ops


def prepare(device: torch.device) -> str:
    """Load (and on the CPU, build) the backend for ``device`` now rather than on the first
    request; returns its name: "triton", "cpu" (C++) or "reference"."""
    ops = _ops_by_device_type.get(device.type) or _load_ops(device.type)
    return "reference" if ops is reference else ops.__name__.rsplit(".", 1)[-1]


def write_kv_cache(key, value, kv_cache, slot_mapping) -> None:
    return _ops_for(key).write_kv_cache(key, value, kv_cache, slot_mapping)


def paged_attention(query, kv_cache, meta, scale, sliding_window=None):
    return _ops_for(query).paged_attention(query, kv_cache, meta, scale, sliding_window)


def attention_trace(query, kv_cache, meta, scale, rows, sliding_window=None):
    """The attention debug trace of ``rows`` (entropy, top-k) from the q and the paged K the
    backend's attention read: the C++ or Triton kernel of that backend; on the reference
    backend the PyTorch op ``kernels/attention_trace.py``, the others' reference."""
    ops = _ops_for(query)
    trace = getattr(ops, "attention_trace", _trace.attention_trace)
    return trace(query, kv_cache, meta, scale, rows, rows.top_k, sliding_window)


def rms_norm(x, weight, eps):
    return _ops_for(x).rms_norm(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps):
    return _ops_for(x).fused_add_rms_norm(x, residual, weight, eps)


def apply_rotary(query, key, positions, cos_sin_cache):
    return _ops_for(query).apply_rotary(query, key, positions, cos_sin_cache)


def silu_and_mul(x):
    return _ops_for(x).silu_and_mul(x)


def dense_linear(x, weight, bias=None):
    """x @ weight^T + bias for an unquantized weight (``F.linear`` semantics)."""
    return _ops_for(x).dense_linear(x, weight, bias)


def wna16_linear(x, qweight, scales, zeros, bits, group_size, bias=None):
    """Weight-only int8/int4 linear on the canonical layout (``ferry.kernels.quant_linear``)."""
    return _ops_for(x).wna16_linear(x, qweight, scales, zeros, bits, group_size, bias)


def wna16_linear_a8(x, qweight, scales, zeros, bits, group_size, bias=None):
    """``wna16_linear`` with the activations quantized to int8 per group (the
    ``cpu_int8_activations`` switch): the C++ VNNI kernel on the CPU backend (which runs
    the float-activation kernel where VNNI does not fit), the PyTorch reference
    (``quant_reference.wna16_linear_a8``) elsewhere."""
    ops = _ops_for(x)
    op = getattr(ops, "wna16_linear_a8", reference.wna16_linear_a8)
    return op(x, qweight, scales, zeros, bits, group_size, bias)


def bf16_weight_linear(x, weight, bias=None):
    """x @ weight^T + bias with a bfloat16 weight, float32 arithmetic, x's dtype out."""
    return _ops_for(x).bf16_weight_linear(x, weight, bias)


def apply_token_bitmask(logits, bitmask, rows=None):
    """Structured output's token mask on the logits (``reference.apply_token_bitmask``)."""
    return _ops_for(logits).apply_token_bitmask(logits, bitmask, rows)


def decoder_stack(shape, layers, cos_sin_cache):
    """The fused float32 decoder stack of the C++ backend (``kernels/cpu/decoder_stack.py``)
    for these layer weights, or None: another backend runs them, ``FERRY_CPU_DECODER_STACK``
    is 0, or a weight does not fit (logged). The layer-by-layer path is its reference."""
    if os.environ.get("FERRY_CPU_DECODER_STACK", "1") == "0":
        return None
    if _ops_for(cos_sin_cache).__name__ != "ferry.kernels.cpu":
        return None
    from ferry.kernels.cpu.decoder_stack import F32DecoderStack
    stack = F32DecoderStack.build(shape, layers, cos_sin_cache)
    if stack is None:
        logger.info("Decode steps run layer by layer: %s.", F32DecoderStack.why_not)
    return stack


def lora_shrink(x, lora_a, mapping):
    return _ops_for(x).lora_shrink(x, lora_a, mapping)


def lora_expand(v, lora_b, y, mapping):
    return _ops_for(y).lora_expand(v, lora_b, y, mapping)


__all__ = ["OP_NAMES", "apply_rotary", "apply_token_bitmask", "attention_trace",
           "bf16_weight_linear", "decoder_stack", "dense_linear", "fused_add_rms_norm",
           "lora_expand", "wna16_linear_a8",
           "lora_shrink", "paged_attention", "prepare", "rms_norm", "silu_and_mul", "wna16_linear",
           "write_kv_cache"]
