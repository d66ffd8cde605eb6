"""Weight-only integer GEMM (``wna16_linear``): the one call every int4/int8 weight format makes.

GPTQ, AWQ and compressed-tensors ``pack-quantized`` weights are converted at load into the
canonical layout below (``ferry.quant.wna16``), so one kernel serves them all. This is the
pure PyTorch version (dequantize, then ``F.linear``): the reference the fast CPU/Triton
kernels are checked against.

Canonical layout, for a weight of N outputs and K inputs in groups of ``group_size`` inputs:

- ``qweight``: bits=8: uint8 (N, K); bits=4: uint8 (N, K // 2), the low nibble holds the
  even input k, the high nibble the odd one;
- ``scales``, ``zeros``: (N, K // group_size), the activations' dtype;
  w[n, k] = (q[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]
  (symmetric formats have zero = 2 ** (bits - 1)); ``group_size == K`` is per-channel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def unpack_canonical(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical ``qweight`` -> integer codes (N, K) uint8 in [0, 2**bits)."""
    if bits == 8:
        return qweight
    if bits != 4:
        raise ValueError(f"wna16_linear supports bits 4 and 8, got {bits}")
    low, high = qweight & 0xF, qweight >> 4                               # (N, K/2) each
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1)  # (N, K)


def pack_canonical(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (N, K) in [0, 2**bits) -> canonical ``qweight`` (uint8)."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if bits != 4:
        raise ValueError(f"wna16_linear supports bits 4 and 8, got {bits}")
    if codes.shape[1] % 2:
        raise ValueError(f"4-bit weights need an even number of inputs, got {codes.shape[1]}")
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()           # (N, K/2)


def dequantize_wna16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     bits: int, group_size: int) -> torch.Tensor:
    """The float weight (N, K) in the scales' dtype."""
    codes = unpack_canonical(qweight, bits)                               # (N, K)
    scale = scales.repeat_interleave(group_size, dim=1)                   # (N, K)
    zero = zeros.repeat_interleave(group_size, dim=1)                     # (N, K)
    return (codes.to(scales.dtype) - zero) * scale


def wna16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, bits: int, group_size: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, K) @ dequantized(qweight)^T (+ bias) -> (T, N), in x's dtype."""
    weight = dequantize_wna16(qweight, scales, zeros, bits, group_size)   # (N, K)
    return F.linear(x, weight.to(x.dtype), bias)                          # (T, N)
