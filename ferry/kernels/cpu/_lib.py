"""The compiled library's C functions with their ctypes signatures, declared once."""
from __future__ import annotations

import ctypes
import functools
from types import SimpleNamespace

import torch

from ferry.kernels.cpu.build import load_library

# Element types the C++ kernels take (ferry::DType in csrc/dtype.h); others use the reference.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
# The FP8 KV cache's element type (csrc/fp8.h); its kernels take float32/bf16 activations.
FP8_CACHE_DTYPE = torch.float8_e4m3fn

_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "ferry_paged_attention": [_INT, _P, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64,
                              _F32, _I64, _P, _INT],
    "ferry_rms_norm": [_INT, _P, _I64, _P, _F32, _I64, _I64, _P, _INT],
    "ferry_fused_add_rms_norm": [_INT, _P, _I64, _P, _I64, _P, _F32, _I64, _I64, _P, _P, _INT],
    "ferry_apply_rotary": [_INT, _P, _I64, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _INT],
    "ferry_silu_and_mul": [_INT, _P, _I64, _I64, _I64, _P, _INT],
    "ferry_write_kv_cache": [_INT, _P, _I64, _P, _I64, _P, _I64, _I64, _P, _P],
    "ferry_write_kv_cache_fp8": [_INT, _P, _I64, _P, _I64, _P, _I64, _I64, _P, _P],
    "ferry_paged_attention_fp8": [_INT, _P, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64,
                                  _I64, _F32, _I64, _P, _INT],
    "ferry_wna16_gemm": [_INT, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _INT, _I64, _P, _P, _INT,
                         _INT],
    "ferry_wna16_dequantize": [_INT, _P, _P, _P, _INT, _I64, _I64, _I64, _P, _INT],
    "ferry_wna16_has_simd": [],
    "ferry_wna8_gemm": [_INT, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _INT, _I64, _P, _P, _INT,
                        _INT],
    "ferry_wna8_fits": [_I64],
    "ferry_f32_gemv": [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _INT],
    "ferry_f32_gemv_row_major": [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _INT],
    "ferry_f32_gemv_max_rows": [],
    "ferry_bf16_gemm": [_INT, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _INT, _INT],
    "ferry_lora_shrink": [_INT, _P, _I64, _P, _I64, _I64, _P, _I64, _I64, _I64, _P, _INT],
    "ferry_attention_trace": [_INT, _P, _I64, _P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _I64,
                              _I64, _I64, _F32, _I64, _I64, _P, _P, _P, _INT],
    "ferry_attention_trace_fp8": [_INT, _P, _I64, _P, _I64, _P, _I64, _P, _P, _P, _I64, _I64,
                                  _I64, _I64, _I64, _F32, _I64, _I64, _P, _P, _P, _INT],
    "ferry_apply_token_bitmask": [_P, _P, _I64, _I64, _P, _I64, _P, _I64, _INT],
    "ferry_lora_expand": [_INT, _P, _P, _I64, _I64, _P, _I64, _I64, _I64, _P, _I64, _INT],
}


@functools.cache
def functions() -> SimpleNamespace | None:
    """``functions().paged_attention(...)`` etc. (the ``ferry_`` prefix dropped), or None
    where the library cannot be built."""
    lib = load_library()
    if lib is None:
        return None
    table = {}
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        table[name.removeprefix("ferry_")] = fn
    return SimpleNamespace(**table)


def check(status: int, op: str) -> None:
    if status:
        raise ValueError(f"{op}: the CPU kernel rejected its arguments (code {status})")


def row_layout(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows, width, row stride) when x's last dim is contiguous and its rows are uniformly
    strided (a 2-D view, or any contiguous tensor); None otherwise (the caller falls back)."""
    if x.dim() == 0 or x.stride(-1) != 1:
        return None
    width = x.shape[-1]
    if x.dim() == 2:
        return x.shape[0], width, (x.stride(0) if x.shape[0] > 1 else width)
    if x.is_contiguous():
        return x.numel() // max(width, 1), width, width
    return None


def heads_layout(x: torch.Tensor) -> int | None:
    """Token stride of a (T, heads, D) tensor whose heads are packed per token, else None."""
    if x.dim() != 3 or x.stride(2) != 1 or (x.shape[1] > 1 and x.stride(1) != x.shape[2]):
        return None
    return x.stride(0) if x.shape[0] > 1 else x.shape[1] * x.shape[2]
