"""On-load round-to-nearest quantization of a float checkpoint (``int8`` / ``int4``).

``RtnWeightMethods(bits, group_size)`` is a ``WeightMethods``: every linear loads its
float weight as usual, then ``process_weights_after_loading`` quantizes it RTN into the
canonical weight-only layout (``ferry.kernels.quant_reference``) and frees the float copy;
the forward is ``ferry.kernels.quant_linear.wna16_apply``. Embeddings and the LM head are
not quantized by default (their tables are looked up by token or feed the logits); an
untied head may be kept in bfloat16 (``head_dtype=torch.bfloat16``, the 16-bit precision
policy), which halves the largest single read of a small model's decode step, or
quantized RTN to int8 (``head_dtype=torch.int8``: symmetric, group 128 or per channel,
as llama.cpp's Q8_0 files store ``output.weight``), which quarters it.
``int8_activations`` (``cpu_int8_activations``): CPU inputs of the int linears (and an
int8 head) are quantized to int8 per group too (``kernels.wna16_linear_a8``).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ferry import kernels
from ferry.kernels.decoder_stack_spec import WNA16, Projection
from ferry.kernels.quant_linear import PreparedWna16, prepare_wna16, quantize_rtn, wna16_apply
from ferry.layers.embedding_method import EmbeddingMethod, UnquantizedEmbeddingMethod
from ferry.layers.linear_method import LinearMethod
from ferry.layers.parameter import new_parameter

logger = logging.getLogger(__name__)


class RtnLinearMethod(LinearMethod):
    """A float (out, in) weight at load, RTN-quantized to ``bits`` after loading."""

    def __init__(self, bits: int, group_size: int, symmetric: bool, int8_activations: bool = False):
        if bits not in (4, 8):
            raise ValueError(f"RTN quantization supports bits 4 or 8, got {bits}")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.int8_activations = int8_activations

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype | None) -> None:
        layer.weight = new_parameter((sum(output_sizes), input_size), params_dtype,
                                     output_dim=0, input_dim=1)

    def group_size_for(self, input_size: int) -> int:
        """The configured group size, or per channel when it does not divide the inputs."""
        if self.group_size > 0 and input_size % self.group_size == 0:
            return self.group_size
        return input_size

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight.data                                    # (N, K) float
        group_size = self.group_size_for(weight.shape[1])
        if group_size != self.group_size:
            logger.info("%s: %d inputs are not a multiple of group size %d; quantized per "
                        "channel", getattr(layer, "prefix", "linear"), weight.shape[1], self.group_size)
        quantize_in_place(layer, self.bits, group_size, self.symmetric)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        prepared: PreparedWna16 = layer.quantized
        return wna16_apply(x, prepared, bias, self.int8_activations)  # (T, in) -> (T, out)

    def fused_projection(self, layer: nn.Module) -> Projection | None:
        q: PreparedWna16 = layer.quantized
        bias = None if layer.bias is None else layer.bias.detach()
        return Projection(WNA16, q.qweight, bias, q.scales, q.zeros, q.bits, q.group_size,
                          self.int8_activations)


def quantize_in_place(layer: nn.Module, bits: int, group_size: int, symmetric: bool) -> None:
    """``layer.weight`` (N, K) float -> RTN codes, scales and zeros (``layer.quantized``)."""
    weight = layer.weight.data
    qweight, scales, zeros = quantize_rtn(weight, bits, group_size, symmetric)
    prepared = prepare_wna16(qweight, scales, zeros, bits, group_size, weight.device)
    del layer.weight                                                  # free the float copy
    # Parameters (not plain attributes) so that weight-byte counts and .to() see them.
    for name in ("qweight", "scales", "zeros"):
        layer.register_parameter(name, nn.Parameter(getattr(prepared, name), requires_grad=False))
    layer.quantized = prepared


class Bf16HeadMethod(UnquantizedEmbeddingMethod):
    """An LM head stored in bfloat16 after loading; logits computed in float32 arithmetic
    (``kernels.bf16_weight_linear``). A table also looked up by token (a tied head) stays
    as loaded."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.looks_up_tokens:
            return super().process_weights_after_loading(layer)
        layer.weight.data = layer.weight.data.to(torch.bfloat16).contiguous()   # (V, H)
        self.head_bf16 = True

    def apply(self, layer: nn.Module, hidden: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        if not getattr(self, "head_bf16", False):
            return super().apply(layer, hidden, bias)
        return kernels.bf16_weight_linear(hidden, layer.weight, bias)    # (N, H) -> (N, V)


class Int8HeadMethod(UnquantizedEmbeddingMethod):
    """An LM head quantized RTN to int8 after loading (symmetric; groups of
    ``group_size`` inputs, per channel where they do not divide the hidden size), its
    logits through the int linear kernel. A table also looked up by token stays as loaded."""

    group_size = 128

    def __init__(self, int8_activations: bool = False):
        self.int8_activations = int8_activations

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.looks_up_tokens:
            return super().process_weights_after_loading(layer)
        hidden = layer.weight.shape[1]
        group_size = self.group_size if hidden % self.group_size == 0 else hidden
        quantize_in_place(layer, 8, group_size, symmetric=True)

    def apply(self, layer: nn.Module, hidden: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        prepared: PreparedWna16 | None = getattr(layer, "quantized", None)
        if prepared is None:
            return super().apply(layer, hidden, bias)
        return wna16_apply(hidden, prepared, bias, self.int8_activations)   # (N, H) -> (N, V)


HEAD_DTYPES = (None, torch.bfloat16, torch.int8)


class RtnWeightMethods:
    """RTN ``bits``-bit linears (group-wise, ``group_size`` inputs per scale; symmetric by
    default), unquantized embeddings; the LM head in the model dtype, or in ``head_dtype``
    (``torch.bfloat16``, or ``torch.int8`` RTN). ``int8_activations``: the int linears
    (and an int8 head) quantize their CPU inputs to int8 per group."""

    def __init__(self, bits: int, group_size: int = 128, symmetric: bool = True,
                 head_dtype: torch.dtype | None = None, int8_activations: bool = False):
        if bits not in (4, 8):
            raise ValueError(f"RTN quantization supports bits 4 or 8, got {bits}")
        if head_dtype not in HEAD_DTYPES:
            raise ValueError(f"head_dtype must be None, torch.bfloat16 or torch.int8, got "
                             f"{head_dtype}")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.head_dtype = head_dtype
        self.int8_activations = int8_activations

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod:
        return RtnLinearMethod(self.bits, self.group_size, self.symmetric, self.int8_activations)

    def embedding_method(self, prefix: str, layer: nn.Module) -> EmbeddingMethod:
        if self.head_dtype is None or getattr(layer, "looks_up_tokens", True):
            return UnquantizedEmbeddingMethod()
        if self.head_dtype == torch.int8:
            return Int8HeadMethod(self.int8_activations)
        return Bf16HeadMethod()
