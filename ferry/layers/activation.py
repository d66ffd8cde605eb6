"""Activations of the gated MLP."""
from __future__ import annotations

import torch
from torch import nn

from ferry import kernels


class SiluAndMul(nn.Module):
    """SwiGLU gate: (T, 2I) packed [gate | up] -> silu(gate) * up, (T, I)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.silu_and_mul(x)
