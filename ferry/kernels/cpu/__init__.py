"""C++ kernels for the CPU, compiled on first use (see ``build.py``).

The fast CPU path: every op has a C++ kernel with the reference's signature and
semantics, and falls back to the reference for inputs the kernel does not take (dtypes
other than float32/bfloat16, irregular strides). ``available()`` is False where no compiler
is found or ``FERRY_CPU_KERNELS=0``; ``ferry/kernels/__init__.py`` then uses the
reference for everything.
"""
from __future__ import annotations

from ferry.kernels.cpu.build import load_library
from ferry.kernels.cpu.attention import paged_attention
from ferry.kernels.cpu.attention_trace import attention_trace
from ferry.kernels.cpu.dense import dense_linear
from ferry.kernels.cpu.elementwise import (apply_rotary, fused_add_rms_norm, rms_norm,
                                           silu_and_mul, write_kv_cache)
from ferry.kernels.cpu.quant_linear import bf16_weight_linear, wna16_linear, wna16_linear_a8
from ferry.kernels.cpu.lora import lora_expand, lora_shrink
from ferry.kernels.cpu.token_bitmask import apply_token_bitmask


def available() -> bool:
    return load_library() is not None


__all__ = ["apply_rotary", "apply_token_bitmask", "attention_trace", "available", "bf16_weight_linear", "dense_linear", "fused_add_rms_norm", "lora_expand",
           "lora_shrink", "paged_attention", "rms_norm", "silu_and_mul", "wna16_linear",
           "wna16_linear_a8", "write_kv_cache"]
