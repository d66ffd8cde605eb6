"""What a fused decoder stack is built from (``kernels.decoder_stack``): plain data, the
same for every backend that has one."""
from __future__ import annotations

from dataclasses import dataclass

import torch

F32, WNA16 = "f32", "wna16"


@dataclass
class Projection:
    """One linear of a layer, as its ``LinearMethod`` runs it (``fused_projection``):

    - ``f32``: ``weight`` the float32 (out, in) matrix stored column-major;
    - ``wna16``: ``weight`` the canonical uint8 codes of ``kernels.wna16_linear`` (N, K or
      K/2), with its ``scales`` and ``zeros`` (N, G), ``bits`` and ``group_size``;
      ``int8_activations``: run as ``kernels.wna16_linear_a8`` (``cpu_int8_activations``).
    """

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    bits: int = 0
    group_size: int = 0
    int8_activations: bool = False


@dataclass
class LayerTensors:
    """One decoder layer: its RMSNorm weights and four projections."""

    input_norm: torch.Tensor
    qkv: Projection
    o: Projection
    post_norm: torch.Tensor
    gate_up: Projection
    down: Projection
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
