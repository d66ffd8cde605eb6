"""Linear layers whose parameters know how to load checkpoint tensors.

Each weight carries a ``weight_loader(param, loaded, shard_id=None)`` (nano-vllm style):
the model loader calls it with a checkpoint tensor, and packed layers (QKV, gate/up) copy
it into their shard. Kept as simple classes so a quantization strategy can later replace
their weights and ``forward``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def copy_checked(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy ``loaded`` into ``target`` (casting dtype/device); raise ValueError on shape mismatch."""
    if target.shape != loaded.shape:
        raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, "
                         f"model expects {tuple(target.shape)}")
    target.copy_(loaded)


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
    """Whole-tensor loader for unpacked parameters."""
    if shard_id is not None:
        raise ValueError(f"parameter is not packed, cannot load shard {shard_id!r}")
    copy_checked(param.data, loaded)


def new_parameter(shape: tuple[int, ...], dtype: torch.dtype | None) -> nn.Parameter:
    """Uninitialised inference parameter (filled by the loader) with the default loader."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.weight_loader = default_weight_loader
    return param


class Linear(nn.Module):
    """y = x W^T + b with weight (output_size, input_size)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = new_parameter((output_size, input_size), dtype)
        self.bias = new_parameter((output_size,), dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)   # (T, in) -> (T, out)


class MergedLinear(Linear):
    """Several linears with the same input, packed along the output dim (e.g. gate_up_proj).

    ``shard_sizes`` maps each shard id (the HF sub-module it comes from) to its output
    size, in packing order. Weight and bias load shard by shard.
    """

    def __init__(self, input_size: int, shard_sizes: dict, bias: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__(input_size, sum(shard_sizes.values()), bias, dtype)
        self.shard_offsets: dict = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        self.weight.weight_loader = self.load_shard
        if self.bias is not None:
            self.bias.weight_loader = self.load_shard

    def load_shard(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {list(self.shard_offsets)}")
        offset, size = self.shard_offsets[shard_id]
        copy_checked(param.data.narrow(0, offset, size), loaded)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Split this layer's output (..., output_size) back into its shards."""
        sizes = [size for _, size in self.shard_offsets.values()]
        return list(x.split(sizes, dim=-1))


class QKVLinear(MergedLinear):
    """q_proj, k_proj and v_proj packed into one matmul: output = [q | k | v]."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__(hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                       "v": num_kv_heads * head_dim}, bias, dtype)


def use_column_major_weights(model: nn.Module) -> None:
    """Store each matmul weight as the contiguous transpose of its (out, in) shape (CPU only).

    The parameter keeps its shape and values; only its memory order changes. With a
    row-major weight MKL repacks the whole weight on every call, which for the few rows
    of a decode step costs more than the multiply: column-major measured 1.3-2.2x faster
    for 4-48 rows and the same from 64 up (``benchmarks/cpu_kernels.py``). A head tied to the
    embedding keeps the embedding's row order, which the token lookup wants.
    """
    from ferry.layers.embedding import LMHead, VocabEmbedding
    from ferry.platform import empty_on_huge_pages

    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, VocabEmbedding)}
    for module in model.modules():
        if isinstance(module, (Linear, LMHead)) and id(module.weight) not in embedding_weights:
            weight = module.weight.data                                  # (out, in)
            transposed = empty_on_huge_pages(weight.shape[::-1], weight.dtype)
            module.weight.data = transposed.copy_(weight.t()).t()       # (out, in), column-major
