"""Float32 linears of decode steps through the C++ kernel (``csrc/f32_gemv.cpp``).

Same signature and semantics as ``ferry.kernels.reference.dense_linear`` (``F.linear``).
A float32 input of up to 128 rows (decode batches, short prefill chunks) against a float32 weight, column-major (how
``UnquantizedLinearMethod`` stores every CPU weight) or row-major (the LM head, which
keeps the embedding's order), runs the kernel, which streams the
weight once at close to the memory's read bandwidth and splits it over ferry's worker
pool instead of an OpenMP region; anything else goes to ``F.linear`` (MKL).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ferry.kernels.cpu._lib import check, functions


@functools.cache
def max_kernel_rows() -> int:
    """Rows the kernel takes (0 where the library lacks its AVX-512 path)."""
    return int(functions().f32_gemv_max_rows()) if functions() is not None else 0


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    layout = _kernel_layout(x, weight, bias)
    if layout is None:
        return F.linear(x, weight, bias)
    n, k = weight.shape
    out = torch.empty((x.shape[0], n), dtype=torch.float32)
    kernel = functions().f32_gemv if layout == "column" else functions().f32_gemv_row_major
    check(kernel(
        x.data_ptr(), x.stride(0), x.shape[0], k, n, weight.data_ptr(),
        bias.data_ptr() if bias is not None else None, out.data_ptr(),
        torch.get_num_threads()), "dense_linear")
    return out


def _kernel_layout(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """"column" (the (K, N) storage of a matmul weight) or "row" (a row-major (N, K) weight,
    as the LM head keeps it) when the kernel takes these tensors, else None."""
    usable = (x.dim() == 2 and 0 < x.shape[0] <= max_kernel_rows() and x.dtype == torch.float32
              and weight.dtype == torch.float32 and weight.dim() == 2 and x.stride(1) == 1
              and not x.requires_grad and not weight.requires_grad
              and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())))
    if not usable:
        return None
    if weight.stride() == (1, weight.shape[0]):
        return "column"
    return "row" if weight.is_contiguous() else None
