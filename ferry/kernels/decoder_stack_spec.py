"""What a fused decoder stack is built from (``kernels.decoder_stack``): plain data, the
same for every backend that has one."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerTensors:
    """One decoder layer's weights as the Python layers hold them: (out, in) matmul weights
    stored column-major, biases or None, RMSNorm weights."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    sliding_window: int | None = None


@dataclass(frozen=True)
class StackShape:
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    scale: float
