"""Triton kernels for CUDA and ROCm GPUs, one op per module.

Each op has exactly the signature and semantics of its twin in ``ferry.kernels.reference``;
``ferry/kernels/__init__.py`` selects these when ``Platform.use_triton_kernels``. Importing
this package imports ``triton``: do it only where Triton is available.
"""
from __future__ import annotations

# A bf16 weight on a GPU: the vendor GEMM (torch) is the fast path, with float32 math.
from ferry.kernels.quant_reference import bf16_weight_linear
# Unquantized weights: the vendor GEMM (cuBLAS/hipBLASLt through torch) is the fast path.
from ferry.kernels.reference import dense_linear
# The grammar mask: a few elementwise torch ops on the logits, already on the device.
from ferry.kernels.reference import apply_token_bitmask
from ferry.kernels.triton.attention_trace import attention_trace
from ferry.kernels.triton.fused_add_rms_norm import fused_add_rms_norm
from ferry.kernels.triton.lora import lora_expand, lora_shrink
from ferry.kernels.triton.paged_attention import paged_attention
from ferry.kernels.triton.rms_norm import rms_norm
from ferry.kernels.triton.rotary import apply_rotary
from ferry.kernels.triton.silu_and_mul import silu_and_mul
from ferry.kernels.triton.wna16 import wna16_linear
from ferry.kernels.triton.write_kv_cache import write_kv_cache

__all__ = [
    "apply_rotary",
    "apply_token_bitmask",
    "attention_trace",
    "bf16_weight_linear",
    "dense_linear",
    "fused_add_rms_norm",
    "lora_expand",
    "lora_shrink",
    "paged_attention",
    "rms_norm",
    "silu_and_mul",
    "wna16_linear",
    "write_kv_cache",
]
