"""Integer codes of a weight: the common result of RTN, GPTQ and AWQ, and RTN itself.

``QuantizedWeight`` holds what every integer format stores: w ~ (codes - zeros) * scales
per group of inputs (``g_idx[k]`` is input k's group; act-order permutes it). The format
writers (``formats.py``) pack it into GPTQ, AWQ or compressed-tensors tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    codes: torch.Tensor          # (N, K) int32 in [0, 2**bits)
    scales: torch.Tensor         # (N, G) float32
    zeros: torch.Tensor          # (N, G) int32 (2**(bits-1) when symmetric)
    bits: int
    group_size: int              # -1: one group (per channel)
    sym: bool
    g_idx: torch.Tensor | None = None   # (K,) int32; None: k // group_size

    def group_index(self) -> torch.Tensor:
        """(K,) group of each input."""
        if self.g_idx is not None:
            return self.g_idx.long()
        k = self.codes.shape[1]
        size = k if self.group_size == -1 else self.group_size
        return torch.arange(k) // size

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32 weight the codes stand for."""
        g = self.group_index()
        return (self.codes.float() - self.zeros[:, g].float()) * self.scales[:, g]


def group_params(w: torch.Tensor, bits: int, sym: bool, min_zero: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w`` (R, L) -> (R,), (R,) (GPTQ's quantizer).

    Symmetric: scale = 2 max|w| / (2**bits - 1), zero = 2**(bits-1). Asymmetric: the
    row's [min, max] (always containing 0) on [0, 2**bits - 1]; ``min_zero`` = 1 keeps
    zero >= 1 (GPTQ v1 stores zero - 1, which must not underflow).
    """
    maxq = 2 ** bits - 1
    w = w.float()
    if sym:
        amax = w.abs().amax(dim=1).clamp(min=1e-8)
        return 2 * amax / maxq, torch.full_like(amax, 2 ** (bits - 1), dtype=torch.int32)
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(min_zero, maxq).to(torch.int32)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """round(w / scale) + zero, clamped to [0, 2**bits - 1] (broadcasting)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2 ** bits - 1).to(torch.int32)


def rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool,
        min_zero: int = 0) -> QuantizedWeight:
    """Round-to-nearest of an (N, K) weight in groups of ``group_size`` inputs (-1: per row)."""
    n, k = weight.shape
    size = k if group_size == -1 else group_size
    if k % size:
        raise ValueError(f"group_size {group_size} does not divide {k} inputs")
    groups = weight.float().reshape(n, k // size, size)                  # (N, G, size)
    scale, zero = group_params(groups.reshape(-1, size), bits, sym, min_zero)
    scale, zero = scale.view(n, -1), zero.view(n, -1)                    # (N, G)
    codes = quantize_codes(groups, scale[..., None], zero[..., None], bits).reshape(n, k)
    return QuantizedWeight(codes, scale, zero, bits, group_size, sym)
