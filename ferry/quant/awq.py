"""AWQ checkpoints, GEMM layout (AutoAWQ ``version: gemm``), 4 bits with zero points.

Tensors per linear (N outputs, K inputs, G groups): ``qweight`` (K, N / 8) int32 packed
along the outputs in AWQ's interleaved order (slot i of a word holds output
``AWQ_ORDER[i]`` of its eight), ``qzeros`` (G, N / 8) the same way (the zero itself, no
-1), ``scales`` (G, N). w[n, k] = (q[k, n] - zero[k // group, n]) * scale[k // group, n].
GEMV layouts store a different packing and are refused.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ferry.layers.linear_method import LinearMethod
from ferry.layers.parameter import new_parameter
from ferry.quant.packing import AWQ_ORDER, pack_factor, unpack_int32
from ferry.quant.selection import FormatWeightMethods, one_choice
from ferry.quant.wna16 import Decoded, WNA16LinearMethod


class AWQConfig:
    def __init__(self, raw: dict[str, Any]):
        self.bits = int(raw.get("bits", raw.get("w_bit", 4)))
        if self.bits != 4:
            raise ValueError(f"quantization_config.bits={self.bits} is not supported for awq "
                             "(ferry loads 4-bit AWQ)")
        self.group_size = int(raw.get("group_size", raw.get("q_group_size", 128)))
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config.version={version!r} is not supported for awq: "
                             "ferry loads the GEMM layout only (GEMV layouts pack differently)")
        if not raw.get("zero_point", True):
            raise ValueError("quantization_config.zero_point=false is not supported for awq")
        self.modules_to_not_convert = list(raw.get("modules_to_not_convert") or [])

    label = "awq_int4"

    def quantizes(self, name: str) -> bool:
        return not any(skip in name for skip in self.modules_to_not_convert)


class AWQWeightMethods(FormatWeightMethods):
    label = "awq_int4"

    def __init__(self, config: AWQConfig):
        self.config = config

    def quantized_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        if not one_choice(prefix, self.config.quantizes):
            return None
        return AWQLinearMethod(self.config)


class AWQLinearMethod(WNA16LinearMethod):
    def __init__(self, config: AWQConfig):
        super().__init__(config.bits, config.group_size)

    def checkpoint_params(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales")

    def create_weights(self, layer, input_size, output_sizes, params_dtype):
        out, f = sum(output_sizes), pack_factor(self.bits)
        _, groups = self.groups(input_size, layer.prefix)
        if any(size % f for size in output_sizes):
            raise ValueError(f"{layer.prefix}: output sizes {output_sizes} are not multiples "
                             f"of the {f} codes per int32")
        layer.qweight = new_parameter((input_size, out // f), torch.int32, input_dim=0,
                                      output_dim=1, packed_dim=1, pack_factor=f)
        layer.qzeros = new_parameter((groups, out // f), torch.int32, input_dim=0,
                                     output_dim=1, packed_dim=1, pack_factor=f)
        layer.scales = new_parameter((groups, out), params_dtype, input_dim=0, output_dim=1)

    def decode(self, layer) -> Decoded:
        codes = unpack_int32(layer.qweight.data, 4, dim=1, order=AWQ_ORDER).t()   # (N, K)
        zeros = unpack_int32(layer.qzeros.data, 4, dim=1, order=AWQ_ORDER).t()    # (N, G)
        scales = layer.scales.data.t()                                           # (N, G)
        return Decoded(codes, scales, zeros.to(scales.dtype), None)
