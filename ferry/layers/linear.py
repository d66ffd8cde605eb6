"""Linear layers whose weights come from a ``LinearMethod`` and load themselves.

A layer is built with its checkpoint ``prefix`` and a ``WeightMethods``; the method it
gets registers the weights (``create_weights``) and runs the forward (``apply``). The
layer owns what is the same for every format: the sizes, the bias, and for merged layers
(QKV, gate/up) where each checkpoint shard lands, found from each parameter's layout
attributes (``ferry.layers.parameter.shard_view``).
"""
from __future__ import annotations

import torch
from torch import nn

from ferry.layers.parameter import copy_checked, default_weight_loader, new_parameter, shard_view
from ferry.layers.weight_methods import UNQUANTIZED, WeightMethods


class LinearBase(nn.Module):
    """y = method.apply(x) + b for ``input_size`` inputs and sum(output_sizes) outputs."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool,
                 dtype: torch.dtype | None, prefix: str, weight_methods: WeightMethods | None):
        super().__init__()
        self.input_size = input_size
        self.output_size = sum(output_sizes)
        self.prefix = prefix
        self.weight_method = (weight_methods or UNQUANTIZED).linear_method(prefix, self)
        self.weight_method.create_weights(self, input_size, list(output_sizes), dtype)
        self.bias = new_parameter((self.output_size,), dtype, output_dim=0, input_dim=None) if bias else None
        # LoRA serving adds its delta to whatever the method computed (``ferry.layers.lora``).
        self.lora = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight_method.apply(self, x, self.bias)             # (T, in) -> (T, out)
        if self.lora is None or self.weight_method.adds_lora:
            return y
        return self.lora.apply(x, y)


class Linear(LinearBase):
    """One projection: checkpoint tensors load whole."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 dtype: torch.dtype | None = None, prefix: str = "",
                 weight_methods: WeightMethods | None = None):
        super().__init__(input_size, [output_size], bias, dtype, prefix, weight_methods)


class MergedLinear(LinearBase):
    """Several linears with the same input, packed along the output dim (e.g. gate_up_proj).

    ``shard_sizes`` maps each shard id (the HF sub-module it comes from) to its output
    size, in packing order. Every parameter with an output dim (weight, bias, a method's
    scales...) loads shard by shard; the method may give others their own loader.
    """

    def __init__(self, input_size: int, shard_sizes: dict, bias: bool = False,
                 dtype: torch.dtype | None = None, prefix: str = "",
                 weight_methods: WeightMethods | None = None):
        # Set before the method is chosen, so the selector and the method can read it.
        self.shard_offsets: dict = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        super().__init__(input_size, list(shard_sizes.values()), bias, dtype, prefix, weight_methods)
        for param in self.parameters(recurse=False):
            # a method's own loader (e.g. per-shard scalars) wins; the rest split by output
            splittable = getattr(param, "output_dim", None) is not None
            if splittable and param.weight_loader is default_weight_loader:
                param.weight_loader = self.load_shard

    def load_shard(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy checkpoint shard ``shard_id`` into its outputs of ``param`` (packed or not)."""
        if shard_id not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {list(self.shard_offsets)}")
        offset, size = self.shard_offsets[shard_id]
        copy_checked(shard_view(param, offset, size), loaded)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Split this layer's output (..., output_size) back into its shards."""
        sizes = [size for _, size in self.shard_offsets.values()]
        return list(x.split(sizes, dim=-1))


class QKVLinear(MergedLinear):
    """q_proj, k_proj and v_proj packed into one matmul: output = [q | k | v]."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype | None = None, prefix: str = "",
                 weight_methods: WeightMethods | None = None):
        super().__init__(hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                       "v": num_kv_heads * head_dim}, bias, dtype, prefix, weight_methods)
