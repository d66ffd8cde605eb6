"""PyTorch reference for weight-only integer linears (w8a16 / w4a16) and FP8 helpers.

The canonical runtime layout every integer weight-only format converts to at load
(GPTQ, AWQ, compressed-tensors pack-quantized, on-load RTN):

- ``qweight``: bits=8: uint8 (N, K); bits=4: uint8 (N, K//2), the low nibble holds the
  even input index k, the high nibble the odd one;
- ``scales``, ``zeros``: (N, K//group_size) in the activation dtype;
  ``w[n, k] = (q[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]``
  (symmetric formats use ``zero = 2**(bits-1)``); ``group_size == K`` is per channel.

This is the oracle of the C++ and Triton kernels (same signature, same semantics) and the
path wherever they cannot run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_wna16_args(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, bits: int, group_size: int) -> tuple[int, int]:
    """Validate the canonical layout; returns (N, K). ValueError naming what is wrong."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if x.dim() != 2:
        raise ValueError(f"x must be (T, K), got shape {tuple(x.shape)}")
    k = x.shape[1]
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} must divide K={k}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D uint8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    packed_k = k if bits == 8 else k // 2
    if bits == 4 and k % 2:
        raise ValueError(f"4-bit weights need an even K, got {k}")
    if qweight.shape[1] != packed_k:
        raise ValueError(f"qweight is {tuple(qweight.shape)}, expected ({n}, {packed_k}) for "
                         f"bits={bits}, K={k}")
    groups = k // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.shape != (n, groups):
            raise ValueError(f"{name} is {tuple(t.shape)}, expected ({n}, {groups})")
    return n, k


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """(N, K//2) uint8 -> (N, K) uint8 codes 0..15 (low nibble = even k)."""
    low = qweight & 0x0F
    high = qweight >> 4
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1)   # (N, K)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) integer codes 0..15 -> (N, K//2) uint8, the inverse of ``unpack_int4``."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def codes_of(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The (N, K) integer codes of a canonical ``qweight``."""
    return unpack_int4(qweight) if bits == 4 else qweight


def dequantize_wna16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     bits: int, group_size: int) -> torch.Tensor:
    """The (N, K) float weight, in the dtype of ``scales``: (q - zero) * scale, per group."""
    codes = codes_of(qweight, bits)                                   # (N, K)
    n, k = codes.shape
    grouped = codes.view(n, k // group_size, group_size).to(scales.dtype)   # (N, G, gs)
    weight = (grouped - zeros[:, :, None]) * scales[:, :, None]       # (N, G, gs)
    return weight.view(n, k)


def wna16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, bits: int, group_size: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b with W dequantized from the canonical layout. x (T, K) -> (T, N)."""
    check_wna16_args(x, qweight, scales, zeros, bits, group_size)
    weight = dequantize_wna16(qweight, scales, zeros, bits, group_size).to(x.dtype)
    return F.linear(x, weight, bias)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of an (N, K) float weight into the canonical layout.

    Returns (qweight, scales, zeros), scales and zeros in ``weight``'s dtype. Symmetric:
    ``scale = max|w| / (2**(bits-1) - 1)``, ``zero = 2**(bits-1)``; asymmetric:
    ``scale = (max - min) / (2**bits - 1)``, ``zero = round(-min / scale)``. Computed
    in float32; the codes are those the stored (rounded) scales and zeros reproduce best.
    """
    n, k = weight.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} must divide K={k}")
    w = weight.float().view(n, k // group_size, group_size)          # (N, G, gs)
    qmax = 2 ** bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scales = w.abs().amax(dim=-1) / (half - 1)                    # (N, G)
        zeros = torch.full_like(scales, float(half))
    else:
        lo = w.amin(dim=-1).clamp(max=0)
        hi = w.amax(dim=-1).clamp(min=0)
        scales = (hi - lo) / qmax
        zeros = torch.round(-lo / scales.clamp(min=1e-12)).clamp(0, qmax)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))   # all-zero groups
    scales = scales.to(weight.dtype)
    zeros = zeros.to(weight.dtype)
    codes = torch.round(w / scales.float()[..., None] + zeros.float()[..., None])
    codes = codes.clamp(0, qmax).to(torch.uint8).view(n, k)         # (N, K)
    qweight = pack_int4(codes) if bits == 4 else codes
    return qweight.contiguous(), scales.contiguous(), zeros.contiguous()


# ------------------------------------------------------------------------------ FP8
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max       # 448


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale saturated to e4m3's range and cast to float8_e4m3fn."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """float8 values times scale, in ``dtype``."""
    return (x.float() * scale).to(dtype)


def bf16_weight_linear(x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, K) @ weight (N, K, bfloat16)^T + bias, computed in float32, returned in x's
    dtype: a 16-bit weight (half the bytes of float32) at float32 arithmetic."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


# ------------------------------------------------------- int8 activations (W8A8 / W4A8)
def quantize_activations(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, K) -> (codes (T, K) int32 in [-127, 127], scales (T, K//group_size) float32):
    symmetric int8 per token per group, ``scale = max|x| / 127`` and
    ``code = round(x * (127 / max|x|))`` (0 for an all-zero group), in float32 exactly as
    the C++ kernel (``csrc/wna8.cpp``) computes them."""
    t, k = x.shape
    grouped = x.float().reshape(t, k // group_size, group_size)           # (T, G, gs)
    amax = grouped.abs().amax(dim=-1, keepdim=True)                       # (T, G, 1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    codes = torch.round(grouped * inv).clamp(-127, 127).to(torch.int32)
    return codes.reshape(t, k), (amax / 127.0).squeeze(-1)


def wna16_linear_a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor, bits: int, group_size: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The canonical integer linear with int8 activations (llama.cpp's Q8_0/Q4_0 way):
    x is quantized per token per weight group (``quantize_activations``), then per group
    ``idot = sum_k q xq`` exactly (integers) and
    ``y = sum_g scale_g * sx_g * (idot_g - zero_g * sum_k xq) + bias``. x (T, K) -> (T, N)
    in x's dtype. Differs from ``wna16_linear`` by the activations' rounding."""
    n, k = check_wna16_args(x, qweight, scales, zeros, bits, group_size)
    groups = k // group_size
    xq, sx = quantize_activations(x, group_size)                          # (T, K), (T, G)
    # float64 holds every integer dot exactly (|idot| < 2**53)
    codes = codes_of(qweight, bits).to(torch.float64).reshape(n, groups, group_size)
    xq = xq.to(torch.float64).reshape(-1, groups, group_size)             # (T, G, gs)
    idot = torch.einsum("tgk,ngk->tng", xq, codes)                        # (T, N, G)
    xsum = xq.sum(dim=-1)[:, None, :]                                     # (T, 1, G)
    scale = scales.double()[None] * sx.double()[:, None, :]               # (T, N, G)
    out = (scale * (idot - zeros.double()[None] * xsum)).sum(dim=-1)      # (T, N)
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)
