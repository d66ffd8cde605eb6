"""AWQ (Lin et al. 2023): scale salient input channels up before rounding, fold the
inverse scale into the operation that produces the input.

For a group of linears that share an input X (q/k/v after ``input_layernorm``, gate/up
after ``post_attention_layernorm``, down_proj after up_proj, o_proj after v_proj when
their sizes agree), ``search_scales`` tries s = mean|X|^alpha for alpha in [0, 1) and keeps
the one whose RTN-quantized (W diag(s)) applied to X / s is closest to X W^T. The caller
multiplies the weights' columns by s and divides the producer's output by s, which leaves
the float model unchanged, then rounds (RTN) the scaled weights.
"""
from __future__ import annotations

import torch

from ferry.quant.quantize.rtn import rtn


def search_scales(x: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int,
                  sym: bool, grid: int = 20) -> torch.Tensor:
    """Per-input-channel scales (K,) for the linears ``weights`` (each (N_i, K)) sharing
    inputs ``x`` (R, K)."""
    x = x.float()
    w = torch.cat([wi.float() for wi in weights])                         # (N, K)
    want = x @ w.t()                                                       # (R, N)
    act = x.abs().mean(dim=0).clamp(min=1e-8)                             # (K,)
    best, best_err = torch.ones_like(act), float("inf")
    for step in range(grid):
        alpha = step / grid
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()                                # keep the range centred
        deq = rtn(w * s, bits, group_size, sym).dequantize() / s          # (N, K)
        err = float((x @ deq.t() - want).pow(2).mean())
        if err < best_err:
            best, best_err = s, err
    return best
