"""PyTorch reference of the segmented LoRA ops (Punica/S-LoRA's shrink and expand).

A LoRA layer adds ``scale * B_a (A_a x)`` to a linear's output, where ``a`` is the
adapter of the token's request. With the adapters of a batch stacked in device slots
(``A: (S, r, in)``, and B stored transposed, ``B^T: (S, r, out)``, the scale folded in) the two halves are:

- ``lora_shrink``: v[t] = A[slot(t)] @ x[t], (T, in) -> (T, r), accumulated in float32;
- ``lora_expand``: y[t] += v[t] @ B^T[slot(t)], in place on (T, out), rounded once to y's dtype.

Both stacks keep each rank entry as one contiguous row, so the first ``r`` rows of a
slot (the rank a step reads) are contiguous memory and a row of B^T is a vector add over
the outputs (the layout the CPU kernel streams through).

Tokens are grouped in segments of one slot (``LoRAMapping.segments``); a token in no
segment is left alone (its v row is zero). This is the oracle of the C++ and Triton twins.
"""
from __future__ import annotations

import torch

from ferry.kernels.lora_metadata import LoRAMapping


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, mapping: LoRAMapping) -> torch.Tensor:
    """x (T, in), lora_a (S, r, in) -> v (T, r) float32 (zero outside the segments)."""
    v = torch.zeros((x.shape[0], lora_a.shape[1]), dtype=torch.float32, device=x.device)
    for start, end, slot in mapping.segments:
        v[start:end] = x[start:end].float() @ lora_a[slot].float().t()     # (n, r)
    return v


def lora_expand(v: torch.Tensor, lora_b: torch.Tensor, y: torch.Tensor,
                mapping: LoRAMapping) -> None:
    """y (T, out) += v (T, r) @ lora_b[slot] (r, out) per segment, in place."""
    for start, end, slot in mapping.segments:
        delta = v[start:end] @ lora_b[slot].float()                         # (n, out)
        y[start:end] = (y[start:end].float() + delta).to(y.dtype)
