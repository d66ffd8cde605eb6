"""Quantized linears for the weight methods: the one entry point of every integer format.

Every integer weight-only format (GPTQ, AWQ, compressed-tensors pack-quantized, on-load
RTN) converts its checkpoint tensors at load into ONE canonical layout (described in
``ferry.kernels.quant_reference``) and calls :func:`wna16_linear`; the backend (C++ on
the CPU, Triton on GPUs, else the PyTorch reference) is chosen in ``ferry.kernels``.

How a ``LinearMethod`` uses it:

- simplest: ``wna16_linear(x, qweight, scales, zeros, bits, group_size, bias)`` on the
  canonical tensors (the reference contract; always works);
- preferred: in ``process_weights_after_loading`` call ``prepare_wna16(...)`` once and
  keep the returned :class:`PreparedWna16`, then ``wna16_apply(x, prepared, bias)`` in
  ``apply``. It validates once and makes the tensors contiguous on the weight's device;
  a backend that wants another memory layout repacks there, never per call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ferry import kernels
from ferry.kernels.quant_reference import (FP8_DTYPE, FP8_MAX, check_wna16_args, codes_of,
                                           dequantize_fp8, dequantize_wna16, pack_int4,
                                           quantize_fp8, quantize_rtn, unpack_int4)


def wna16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, bits: int, group_size: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, K) @ dequant(qweight)^T + bias -> (T, N), dequantizing inside the kernel.

    qweight: bits=8 uint8 (N, K); bits=4 uint8 (N, K//2), low nibble = even k.
    scales, zeros: (N, K//group_size) in x's dtype; w = (q - zero) * scale.
    """
    return kernels.wna16_linear(x, qweight, scales, zeros, bits, group_size, bias)


def wna16_linear_a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor, bits: int, group_size: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``wna16_linear`` with x quantized to int8 per token per weight group and integer
    dot products (``quant_reference.wna16_linear_a8``; the ``cpu_int8_activations``
    switch). On the CPU the C++ VNNI kernel; it runs the float-activation kernel where
    VNNI does not fit and for prefills of more than ``MAX_KERNEL_ROWS`` rows."""
    return kernels.wna16_linear_a8(x, qweight, scales, zeros, bits, group_size, bias)


@dataclass(frozen=True)
class PreparedWna16:
    """A linear's weights in the canonical layout, validated and ready for the kernels."""

    qweight: torch.Tensor    # uint8 (N, K) or (N, K//2)
    scales: torch.Tensor     # (N, G)
    zeros: torch.Tensor      # (N, G)
    bits: int
    group_size: int
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        """Bytes of weight storage (codes, scales and zeros)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


def prepare_wna16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                  group_size: int, device: torch.device | str | None = None) -> PreparedWna16:
    """Validate the canonical tensors once and move them (contiguous) to ``device``."""
    device = torch.device(device) if device is not None else qweight.device
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    probe = torch.empty((0, k), dtype=scales.dtype)
    check_wna16_args(probe, qweight.cpu() if qweight.is_meta else qweight, scales, zeros,
                     bits, group_size)
    return PreparedWna16(qweight.to(device).contiguous(), scales.to(device).contiguous(),
                         zeros.to(device).contiguous(), bits, group_size, k, n)


def wna16_apply(x: torch.Tensor, prepared: PreparedWna16, bias: torch.Tensor | None = None,
                int8_activations: bool = False) -> torch.Tensor:
    """The forward of a prepared linear: x (T, K) -> (T, N). ``int8_activations``: on CPU
    inputs, ``wna16_linear_a8`` (elsewhere the float-activation kernel)."""
    op = kernels.wna16_linear_a8 if int8_activations and x.is_cpu else kernels.wna16_linear
    return op(x, prepared.qweight, prepared.scales, prepared.zeros, prepared.bits,
              prepared.group_size, bias)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None,
               input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 W8A8 linear: x (T, K) float, weight (N, K) float8_e4m3fn, weight_scale a scalar
    or (N,) / (N, 1) per-channel. Uses ``torch._scaled_mm`` where the device has FP8
    matmuls (CUDA sm_89+, MI300); elsewhere dequantizes the weight and runs a float GEMM
    (weight-only: activations stay in x's dtype). ``input_scale`` None: dynamic per-tensor.
    """
    from ferry.platform import has_fp8_matmul    # only the GPU path needs the platform
    scale = weight_scale.float().reshape(-1)
    if x.is_cuda and has_fp8_matmul(x.device):
        return _scaled_mm_linear(x, weight, scale, bias, input_scale)
    w = dequantize_fp8(weight, scale[:, None] if scale.numel() > 1 else scale, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def _scaled_mm_linear(x, weight, weight_scale, bias, input_scale):
    if input_scale is None:
        input_scale = (x.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    x_fp8 = quantize_fp8(x, input_scale)
    scale_a = input_scale.float().reshape(1, 1)
    if weight_scale.numel() > 1:      # per-channel: rowwise scales for both operands
        scale_a = scale_a.expand(x.shape[0], 1).contiguous()
        scale_b = weight_scale.reshape(1, -1).contiguous()
    else:
        scale_b = weight_scale.reshape(1, 1)
    out = torch._scaled_mm(x_fp8, weight.t(), scale_a=scale_a, scale_b=scale_b,
                           out_dtype=x.dtype, bias=bias)
    return out


def unpack_canonical(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical ``qweight`` -> integer codes (N, K) uint8 in [0, 2**bits)."""
    _check_bits(bits)
    return codes_of(qweight, bits)


def pack_canonical(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (N, K) in [0, 2**bits) -> canonical ``qweight`` (uint8, contiguous)."""
    _check_bits(bits)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if codes.shape[1] % 2:
        raise ValueError(f"4-bit weights need an even number of inputs, got {codes.shape[1]}")
    return pack_int4(codes).contiguous()


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"weight-only integer linears support bits 4 and 8, got {bits}")


__all__ = ["FP8_DTYPE", "FP8_MAX", "PreparedWna16", "dequantize_fp8", "dequantize_wna16",
           "fp8_linear", "pack_canonical", "pack_int4", "prepare_wna16", "quantize_fp8", "quantize_rtn",
           "unpack_canonical", "unpack_int4", "wna16_apply", "wna16_linear", "wna16_linear_a8"]
