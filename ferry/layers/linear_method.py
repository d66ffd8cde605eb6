"""How a linear layer stores its weights and multiplies by them: the ``LinearMethod`` strategy.

A layer asks its ``WeightMethods`` (``ferry.layers.weight_methods``) for one method, which
registers the layer's parameters, prepares them once after loading and runs the forward.
Quantized formats (GPTQ, AWQ, FP8, ...) are further methods; the layers and the loader
stay the same.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from ferry import kernels
from ferry.kernels.decoder_stack_spec import F32, Projection
from ferry.layers.parameter import new_parameter
from ferry.platform import empty_on_huge_pages


class LinearMethod(ABC):
    """The weights and forward of one linear layer (y = x W^T + b, in some storage format).

    Contract, in call order:

    1. ``create_weights`` registers the layer's parameters on ``layer`` (e.g. ``weight``,
       ``weight_scale``), each with a ``weight_loader`` and the layout attributes of
       ``ferry.layers.parameter`` (``output_dim``, ``input_dim``, ``packed_dim``,
       ``pack_factor``): the loader fills them from the checkpoint tensors of the same
       names with no knowledge of the format. ``output_sizes`` are the sizes of the
       layer's merged outputs in order (one entry for a plain linear); the layer creates
       the bias, unquantized, and passes it to ``apply``.
    2. ``process_weights_after_loading`` runs exactly once, after every tensor is loaded,
       on the device the weights now live on (repacking, transposing, ...).
    3. ``apply`` is the forward, on every call: keep it free of per-call dispatch.
    """

    #: True when ``apply`` adds ``layer.lora``'s delta itself (a row-parallel method adds it
    #: before its all-reduce); otherwise the layer adds it to what ``apply`` returns.
    adds_lora: bool = False

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype | None) -> None:
        """Register the parameters of a layer with ``input_size`` inputs and sum(output_sizes) outputs."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Prepare the loaded weights for ``apply`` (default: nothing to do)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(T, input_size) -> (T, output_size), plus ``bias`` when given."""

    def fused_projection(self, layer: nn.Module) -> Projection | None:
        """The loaded weights as a fused decoder stack runs them (``kernels.decoder_stack``),
        when ``apply`` is exactly one of its projection kinds; None (the default): the layer
        runs its own ``apply``."""
        return None


def input_part(layer: nn.Module) -> tuple[int, int]:
    """(index of this layer's first input in the whole layer, inputs of the whole layer).

    ``(0, layer.input_size)`` unless tensor parallelism gave the layer one rank's slice of
    the inputs (a row-parallel layer records ``layer.tp_input_part``): a format whose
    checkpoint tensors number the inputs or their groups (an act-order ``g_idx``, a stored
    weight shape) reads them against the whole layer.
    """
    return getattr(layer, "tp_input_part", None) or (0, layer.input_size)


class UnquantizedLinearMethod(LinearMethod):
    """A plain (out, in) weight in the model dtype and ``kernels.dense_linear``; column-major on
    the CPU."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype | None) -> None:
        layer.weight = new_parameter((sum(output_sizes), input_size), params_dtype,
                                     output_dim=0, input_dim=1)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.weight.device.type == "cpu":
            store_column_major(layer.weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return kernels.dense_linear(x, layer.weight, bias)   # (T, in) -> (T, out)

    def fused_projection(self, layer: nn.Module) -> Projection | None:
        return Projection(F32, layer.weight.detach(), _detached(layer.bias))


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def store_column_major(param: nn.Parameter) -> None:
    """Store a CPU matmul weight as the contiguous transpose of its (out, in) shape.

    The parameter keeps its shape and values; only its memory order changes. With a
    row-major weight MKL repacks the whole weight on every call, which for the few rows
    of a decode step costs more than the multiply: column-major measured 1.3-2.2x faster
    for 4-48 rows and the same from 64 up (``benchmarks/cpu_kernels.py``). A table that is
    also looked up by token (the embedding, and a head tied to it) keeps its row order,
    which the lookup wants: its method does not call this.
    """
    weight = param.data                                               # (out, in)
    transposed = empty_on_huge_pages(weight.shape[::-1], weight.dtype)
    param.data = transposed.copy_(weight.t()).t()                     # (out, in), column-major
