"""On-load round-to-nearest quantization of a float checkpoint (``int8`` / ``int4``).

``RtnWeightMethods(bits, group_size)`` is a ``WeightMethods``: every linear loads its
float weight as usual, then ``process_weights_after_loading`` quantizes it RTN into the
canonical weight-only layout (``ferry.kernels.quant_reference``) and frees the float copy;
the forward is ``ferry.kernels.quant_linear.wna16_apply``. Embeddings and the LM head stay
unquantized in the model dtype (their tables are looked up by token or feed the logits).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ferry.kernels.quant_linear import PreparedWna16, prepare_wna16, quantize_rtn, wna16_apply
from ferry.layers.embedding_method import EmbeddingMethod, UnquantizedEmbeddingMethod
from ferry.layers.linear_method import LinearMethod
from ferry.layers.parameter import new_parameter

logger = logging.getLogger(__name__)


class RtnLinearMethod(LinearMethod):
    """A float (out, in) weight at load, RTN-quantized to ``bits`` after loading."""

    def __init__(self, bits: int, group_size: int, symmetric: bool):
        if bits not in (4, 8):
            raise ValueError(f"RTN quantization supports bits 4 or 8, got {bits}")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric

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
        qweight, scales, zeros = quantize_rtn(weight, self.bits, group_size, self.symmetric)
        prepared = prepare_wna16(qweight, scales, zeros, self.bits, group_size, weight.device)
        del layer.weight                                              # free the float copy
        # Parameters (not plain attributes) so that weight-byte counts and .to() see them.
        for name in ("qweight", "scales", "zeros"):
            layer.register_parameter(name, nn.Parameter(getattr(prepared, name), requires_grad=False))
        layer.quantized = prepared

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        prepared: PreparedWna16 = layer.quantized
        return wna16_apply(x, prepared, bias)                         # (T, in) -> (T, out)


class RtnWeightMethods:
    """RTN ``bits``-bit linears (group-wise, ``group_size`` inputs per scale; symmetric by
    default), unquantized embeddings and LM head."""

    def __init__(self, bits: int, group_size: int = 128, symmetric: bool = True):
        if bits not in (4, 8):
            raise ValueError(f"RTN quantization supports bits 4 or 8, got {bits}")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod:
        return RtnLinearMethod(self.bits, self.group_size, self.symmetric)

    def embedding_method(self, prefix: str, layer: nn.Module) -> EmbeddingMethod:
        return UnquantizedEmbeddingMethod()
