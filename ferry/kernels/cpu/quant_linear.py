"""Weight-only int8/int4 linears through the C++ kernel (``csrc/wna16.cpp``).

Same signature and semantics as ``ferry.kernels.quant_reference.wna16_linear``. Up to
``MAX_KERNEL_ROWS`` tokens (decode batches, short prefills) run the fused kernel, which
streams the packed codes once; longer inputs dequantize the weight (C++) and run one
float GEMM, which is faster once the multiply, not the weight read, is the cost. Dtypes
the kernel does not take (float16, mixed) go to the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ferry.kernels import quant_reference
from ferry.kernels.cpu._lib import DTYPE_CODES, check, functions, row_layout

# Above this many tokens dequantize-then-GEMM wins (benchmarks/cpu_quant.py --kernel).
MAX_KERNEL_ROWS = 32


def _usable(x: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            bias: torch.Tensor | None) -> bool:
    return (functions() is not None and x.dtype in DTYPE_CODES and x.is_cpu
            and scales.dtype == x.dtype and zeros.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype))


def wna16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, bits: int, group_size: int,
                 bias: torch.Tensor | None = None, allow_simd: bool = True) -> torch.Tensor:
    """``allow_simd=False`` forces the portable C++ loop (the tests compare both paths)."""
    if not _usable(x, scales, zeros, bias):
        return quant_reference.wna16_linear(x, qweight, scales, zeros, bits, group_size, bias)
    if x.shape[0] > MAX_KERNEL_ROWS:
        quant_reference.check_wna16_args(x, qweight, scales, zeros, bits, group_size)
        return F.linear(x, dequantize(qweight, scales, zeros, bits, group_size), bias)
    return _int_gemm(functions().wna16_gemm, "wna16_linear", x, qweight, scales, zeros, bits,
                     group_size, bias, allow_simd)


def _int_gemm(kernel, op: str, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              zeros: torch.Tensor, bits: int, group_size: int, bias: torch.Tensor | None,
              allow_simd: bool) -> torch.Tensor:
    """Run ``kernel`` (``wna16_gemm`` or ``wna8_gemm``, the same C arguments) on
    checked, contiguous inputs."""
    n, k = quant_reference.check_wna16_args(x, qweight, scales, zeros, bits, group_size)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    layout = row_layout(x)
    if layout is None:
        x = x.contiguous()
        layout = row_layout(x)
    rows, _, stride = layout
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty((rows, n), dtype=x.dtype)
    check(kernel(
        DTYPE_CODES[x.dtype], x.data_ptr(), stride, rows, k, n, qweight.data_ptr(),
        scales.data_ptr(), zeros.data_ptr(), bits, group_size,
        bias.data_ptr() if bias is not None else None, out.data_ptr(), int(allow_simd),
        torch.get_num_threads()), op)
    return out


def int8_activations_fit(group_size: int) -> bool:
    """True when ``wna16_linear_a8`` runs its VNNI kernel for this group size (a CPU with
    AVX512-VNNI, ``group_size % 64 == 0``)."""
    return functions() is not None and bool(functions().wna8_fits(group_size))


def wna16_linear_a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor, bits: int, group_size: int,
                    bias: torch.Tensor | None = None, allow_simd: bool = True) -> torch.Tensor:
    """``quant_reference.wna16_linear_a8`` through ``csrc/wna8.cpp`` (int8 activations,
    VNNI dot products). Where the VNNI kernel does not fit (no AVX512-VNNI, a group size
    not a multiple of 64) and for inputs of more than ``MAX_KERNEL_ROWS`` rows (prefills,
    where a float GEMM is faster) this is the float-activation ``wna16_linear``: the
    switch is a speed option. ``allow_simd=False`` forces the portable twin of the VNNI
    loop (same integer math; the tests compare both)."""
    fits = allow_simd is False or int8_activations_fit(group_size)
    if not _usable(x, scales, zeros, bias) or not fits or x.shape[0] > MAX_KERNEL_ROWS:
        return wna16_linear(x, qweight, scales, zeros, bits, group_size, bias)
    return _int_gemm(functions().wna8_gemm, "wna16_linear_a8", x, qweight, scales, zeros, bits,
                     group_size, bias, allow_simd)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_size: int) -> torch.Tensor:
    """The (N, K) weight in the scales' dtype, as ``quant_reference.dequantize_wna16``."""
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    if functions() is None or scales.dtype not in DTYPE_CODES or zeros.dtype != scales.dtype:
        return quant_reference.dequantize_wna16(qweight, scales, zeros, bits, group_size)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    out = torch.empty((n, k), dtype=scales.dtype)
    check(functions().wna16_dequantize(
        DTYPE_CODES[scales.dtype], qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), bits,
        n, k, group_size, out.data_ptr(), torch.get_num_threads()), "wna16_dequantize")
    return out


def has_simd() -> bool:
    """True when the library was built with the AVX-512 path."""
    return functions() is not None and bool(functions().wna16_has_simd())


def bf16_weight_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       allow_simd: bool = True) -> torch.Tensor:
    """x (T, K) float32/bf16 @ weight (N, K) bfloat16 ^T (+ bias, bf16) -> (T, N) in x's
    dtype, products and sums in float32 (``csrc/bf16_gemm.cpp``). Long inputs, other
    dtypes or layouts: ``F.linear`` on the widened weight."""
    usable = (functions() is not None and x.dtype in DTYPE_CODES and weight.dtype == torch.bfloat16
              and weight.is_contiguous() and (bias is None or bias.dtype == torch.bfloat16)
              and x.shape[0] <= MAX_KERNEL_ROWS)
    if not usable:
        return quant_reference.bf16_weight_linear(x, weight, bias)
    layout = row_layout(x)
    if layout is None:
        x = x.contiguous()
        layout = row_layout(x)
    rows, k, stride = layout
    out = torch.empty((rows, weight.shape[0]), dtype=x.dtype)
    check(functions().bf16_gemm(
        DTYPE_CODES[x.dtype], x.data_ptr(), stride, rows, k, weight.shape[0], weight.data_ptr(),
        bias.contiguous().data_ptr() if bias is not None else None, out.data_ptr(),
        int(allow_simd), torch.get_num_threads()), "bf16_weight_linear")
    return out
