"""Inference parameters that describe their own layout, and the loaders that read it.

Each parameter carries a ``weight_loader(param, loaded, shard_id=None)`` (nano-vllm style)
that the model loader calls with a checkpoint tensor, and the attributes a loader needs
to place a tensor without knowing its format:

- ``output_dim`` / ``input_dim``: which dim runs along the layer's outputs / inputs
  (None: the tensor has no such dim, e.g. a bias has no input dim);
- ``packed_dim`` / ``pack_factor``: the dim along which ``pack_factor`` logical values
  share one stored element (int4 in int32: 8). Unpacked tensors have neither.

A merged layer (QKV, gate/up) finds a shard's place from these alone (``shard_view``),
so a quantized method's packed weights load with no per-format code in the loader.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def copy_checked(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy ``loaded`` into ``target`` (casting dtype/device); raise ValueError on shape mismatch."""
    if target.shape != loaded.shape:
        raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, "
                         f"model expects {tuple(target.shape)}")
    target.copy_(loaded)


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
    """Whole-tensor loader for parameters that are not sharded."""
    if shard_id is not None:
        raise ValueError(f"parameter is not packed, cannot load shard {shard_id!r}")
    copy_checked(param.data, loaded)


def new_parameter(shape: tuple[int, ...], dtype: torch.dtype | None, **attrs: Any) -> nn.Parameter:
    """Uninitialised inference parameter (filled by the loader) with the default loader.

    ``attrs`` (``output_dim=0, input_dim=1``, ``packed_dim``, ``pack_factor``, ...) are set
    on the parameter for the loader to read.
    """
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.weight_loader = default_weight_loader
    for name, value in attrs.items():
        setattr(param, name, value)
    return param


def shard_view(param: torch.Tensor, offset: int, size: int) -> torch.Tensor:
    """The slice of ``param`` holding outputs [offset, offset + size) of a merged layer.

    The slice runs along ``param.output_dim``; when that is also the packed dim, offsets
    count stored elements, so both divide by ``pack_factor``. A parameter without an
    output dim cannot be split by output: ValueError.
    """
    output_dim = getattr(param, "output_dim", None)
    if output_dim is None:
        raise ValueError("parameter has no output dim, cannot load a shard into it")
    if getattr(param, "packed_dim", None) == output_dim:
        factor = param.pack_factor
        if offset % factor or size % factor:
            raise ValueError(f"shard [{offset}, {offset + size}) is not a multiple of the "
                             f"pack factor {factor}")
        offset, size = offset // factor, size // factor
    return param.data.narrow(output_dim, offset, size)
