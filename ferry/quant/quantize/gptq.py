"""GPTQ (Frantar et al. 2022): quantize columns in order, each error pushed onto the
columns not yet quantized through the inverse Hessian of the layer's inputs.

``gptq(W, H, ...)``: W (N, K) float weight, H (K, K) = 2/n sum x x^T over the calibration
inputs. Dampening adds ``damp`` x mean(diag H) to the diagonal; columns are processed in
blocks of ``block_size`` with the updates to later blocks applied lazily, once per block;
``act_order`` quantizes columns by decreasing diag(H) (the result's ``g_idx`` then records
each input's group).
"""
from __future__ import annotations

import torch

from ferry.quant.quantize.rtn import QuantizedWeight, group_params, quantize_codes


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, sym: bool,
         act_order: bool = False, damp: float = 0.01, block_size: int = 128,
         min_zero: int = 0) -> QuantizedWeight:
    w = weight.float().clone()                                             # (N, K)
    h = hessian.float().clone()                                            # (K, K)
    n, k = w.shape
    size = k if group_size == -1 else group_size
    if k % size:
        raise ValueError(f"group_size {group_size} does not divide {k} inputs")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(n, k, dtype=torch.int32)
    scales = torch.zeros(n, k // size)
    zeros = torch.zeros(n, k // size, dtype=torch.int32)
    if group_size == -1:
        scales[:, 0], zeros[:, 0] = group_params(w, bits, sym, min_zero)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()                                           # (N, B) updated in place
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size != -1 and col % size == 0:    # the group's params from updated weights
                ahead = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :size]
                scales[:, col // size], zeros[:, col // size] = group_params(ahead, bits, sym, min_zero)
            g = col // size
            scale, zero = scales[:, g], zeros[:, g]
            q = quantize_codes(w1[:, i], scale, zero, bits)                # (N,)
            codes[:, col] = q
            dq = (q - zero).float() * scale
            err = (w1[:, i] - dq) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]                               # lazy batch update

    inverse = torch.argsort(perm)
    g_idx = None
    if act_order:
        g_idx = (inverse // size).to(torch.int32)                          # input k's group
    return QuantizedWeight(codes[:, inverse], scales, zeros, bits, group_size, sym, g_idx)
