"""INT8 weights and activations (compressed-tensors ``int-quantized`` W8A8).

Weights: (N, K) int8, symmetric, a scale per output channel or per tensor (one per
merged shard). Activations: symmetric int8 with a scale per token computed on the fly
(dynamic) or one static ``input_scale``. y = (xq @ wq^T) * x_scale * w_scale. The
reference path multiplies the integer values in float32 (exact while K * 127 * 128 stays
below 2**24, and within float32 rounding beyond).
"""
from __future__ import annotations

import torch
from torch import nn

from ferry.layers.linear_method import LinearMethod
from ferry.layers.parameter import new_parameter
from ferry.quant.fp8 import rows_from_shards
from ferry.quant.wna16 import per_shard_scalar


def int8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(x / scale) saturated to [-128, 127], as int8."""
    return torch.round(x.float() / scale).clamp(-128, 127).to(torch.int8)


class Int8LinearMethod(LinearMethod):
    """``weight_strategy``: "channel" or "tensor"; ``activation``: "token" (dynamic) or "static"."""

    def __init__(self, weight_strategy: str, activation: str):
        if weight_strategy not in ("channel", "tensor") or activation not in ("token", "static"):
            raise ValueError(f"unsupported int8 W8A8 scheme: weights {weight_strategy}, "
                             f"activations {activation}")
        self.weight_strategy, self.activation = weight_strategy, activation

    def create_weights(self, layer: nn.Module, input_size, output_sizes, params_dtype):
        out = sum(output_sizes)
        layer.weight = new_parameter((out, input_size), torch.int8, output_dim=0, input_dim=1)
        if self.weight_strategy == "channel":
            layer.weight_scale = new_parameter((out, 1), torch.float32, output_dim=0, input_dim=None)
        else:
            layer.weight_scale = per_shard_scalar(layer, len(output_sizes), torch.float32)
        if self.activation == "static":
            layer.input_scale = per_shard_scalar(layer, len(output_sizes), torch.float32)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        scale = layer.weight_scale.data
        if self.weight_strategy == "tensor":
            scale = rows_from_shards(layer, scale)                      # (N, 1)
        del layer.weight_scale
        layer.register_buffer("weight_scale_rows", scale.reshape(1, -1).contiguous(),
                              persistent=False)                         # (1, N)
        if self.activation == "static":
            static = layer.input_scale.data.max().reshape(())
            del layer.input_scale
            layer.register_buffer("input_scale_value", static, persistent=False)

    def apply(self, layer, x, bias):
        if self.activation == "static":
            x_scale = layer.input_scale_value
        else:
            x_scale = (x.abs().amax(dim=-1, keepdim=True).float() / 127).clamp(min=1e-12)  # (T, 1)
        xq = int8_quantize(x, x_scale)                                   # (T, K) int8
        acc = xq.float() @ layer.weight.float().t()                      # (T, N) integer values
        out = (acc * x_scale * layer.weight_scale_rows).to(x.dtype)
        return out + bias if bias is not None else out
