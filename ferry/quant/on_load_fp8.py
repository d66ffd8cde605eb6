"""``quant_type: fp8`` on an unquantized checkpoint: weights become FP8 while loading.

Each linear (embeddings and ``lm_head`` stay in the model dtype) loads its float weight
as usual, then keeps it as float8_e4m3fn with one scale per output channel; activations
are quantized per token at run time (``FP8LinearMethod``, channel weights, token inputs).
"""
from __future__ import annotations

from torch import nn

from ferry.layers.linear_method import LinearMethod
from ferry.layers.parameter import new_parameter
from ferry.quant.fp8 import FP8_MAX, FP8LinearMethod, fp8_quantize
from ferry.quant.selection import FormatWeightMethods


class OnLoadFP8LinearMethod(FP8LinearMethod):
    def __init__(self):
        super().__init__("channel", "token")

    def create_weights(self, layer, input_size, output_sizes, params_dtype):
        layer.weight = new_parameter((sum(output_sizes), input_size), params_dtype,
                                     output_dim=0, input_dim=1)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight.data.float()                                      # (N, K)
        scale = (weight.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # (N, 1)
        layer.weight = nn.Parameter(fp8_quantize(weight, scale), requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        super().process_weights_after_loading(layer)


class OnLoadFP8WeightMethods(FormatWeightMethods):
    label = "fp8"

    def quantized_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        return OnLoadFP8LinearMethod()
