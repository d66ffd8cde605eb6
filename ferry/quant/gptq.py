"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout), 4 and 8 bits.

Tensors per linear (N outputs, K inputs, G groups, f = 32 // bits codes per int32):
``qweight`` (K / f, N) int32 packed along the inputs, ``qzeros`` (G, N / f) int32 packed
along the outputs, ``scales`` (G, N), ``g_idx`` (K,) (the group of each input; permuted
under ``desc_act``). w[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n].

Zero points: format v1 (``checkpoint_format: gptq``) stores zero - 1, v2 (``gptq_v2``)
the zero itself. Some checkpoints declare v1 but store v2 zeros; for symmetric weights the
stored value says which (2**(bits-1) - 1 is v1, 2**(bits-1) is v2), and the log says
which convention was used.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from ferry.layers.linear_method import LinearMethod
from ferry.layers.parameter import new_parameter
from ferry.quant.packing import pack_factor, unpack_int32
from ferry.quant.selection import FormatWeightMethods, one_choice
from ferry.quant.wna16 import Decoded, WNA16LinearMethod, g_idx_parameter

logger = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


class GPTQConfig:
    """The parts of a GPTQ ``quantization_config`` ferry reads; anything else is refused."""

    def __init__(self, raw: dict[str, Any]):
        self.bits = int(raw.get("bits", 4))
        if self.bits not in (4, 8):
            raise ValueError(f"quantization_config.bits={self.bits} is not supported for gptq "
                             "(ferry loads 4 and 8 bits)")
        self.group_size = int(raw.get("group_size", 128))
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"quantization_config.group_size={self.group_size} is not valid")
        self.desc_act = bool(raw.get("desc_act", False))
        self.sym = bool(raw.get("sym", True))
        fmt = raw.get("checkpoint_format") or raw.get("format") or "gptq"
        if fmt not in CHECKPOINT_FORMATS:
            raise ValueError(f"quantization_config.checkpoint_format={fmt!r} is not supported "
                             f"(ferry loads {', '.join(CHECKPOINT_FORMATS)})")
        self.checkpoint_format = fmt
        if raw.get("lm_head"):
            raise ValueError("quantization_config.lm_head=true (a quantized lm_head) is not "
                             "supported; ferry keeps lm_head unquantized")
        self.modules_in_block = _flat(raw.get("modules_in_block_to_quantize"))
        self.skip_patterns = _dynamic_skips(raw.get("dynamic") or {})

    @property
    def label(self) -> str:
        return f"gptq_int{self.bits}"

    def quantizes(self, name: str) -> bool:
        if any(re.match(pattern, name) for pattern in self.skip_patterns):
            return False
        if self.modules_in_block is not None:
            return any(name.endswith("." + module) for module in self.modules_in_block)
        return True


def _flat(value) -> list[str] | None:
    if not value:
        return None
    out: list[str] = []
    for item in value:
        out += _flat(item) or [] if isinstance(item, (list, tuple)) else [item]
    return out


def _dynamic_skips(dynamic: dict) -> list[str]:
    """GPTQModel's per-module overrides: "-:REGEX" skips modules; other overrides are refused."""
    skips = []
    for key, value in dynamic.items():
        if key.startswith("-:"):
            skips.append(key[2:])
        else:
            raise ValueError(f"quantization_config.dynamic[{key!r}]={value!r}: per-module bits "
                             "or group sizes are not supported")
    return skips


class GPTQWeightMethods(FormatWeightMethods):
    def __init__(self, config: GPTQConfig):
        self.config = config
        self.label = config.label
        self.zero_convention = ZeroConvention(config)

    def quantized_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        if not one_choice(prefix, self.config.quantizes):
            return None
        return GPTQLinearMethod(self.config, self.zero_convention)


class ZeroConvention:
    """Decides once per model whether stored zeros are zero - 1 (v1) or the zero (v2)."""

    def __init__(self, config: GPTQConfig):
        self.config = config
        self.offset: int | None = None            # added to the stored zeros

    def resolve(self, stored: torch.Tensor, prefix: str) -> int:
        if self.offset is None:
            self.offset, why = detect_zero_offset(stored, self.config)
            logger.info("GPTQ zero points: %s (decided on %s)", why, prefix)
        return self.offset


def detect_zero_offset(stored: torch.Tensor, config: GPTQConfig) -> tuple[int, str]:
    """(offset to add to stored zeros, the reason) for one layer's unpacked ``qzeros``."""
    declared = config.checkpoint_format
    v1, v2 = 2 ** (config.bits - 1) - 1, 2 ** (config.bits - 1)
    if config.sym:
        values = set(torch.unique(stored).tolist())
        if values == {v2} and declared == "gptq":
            return 0, (f"checkpoint declares v1 (gptq) but stores {v2}, the symmetric zero "
                       "itself: read as v2 (zeros used as stored)")
        if values == {v1} and declared == "gptq_v2":
            return 1, (f"checkpoint declares gptq_v2 but stores {v1} = zero - 1: read as v1 "
                       "(stored + 1)")
        if values not in ({v1}, {v2}):
            logger.warning("GPTQ: symmetric checkpoint with unexpected zero points %s; "
                           "using the declared %s convention", sorted(values)[:8], declared)
    return (1, "v1 (stored zero - 1, as declared)") if declared == "gptq" else (
        0, "v2 (stored zero, as declared)")


class GPTQLinearMethod(WNA16LinearMethod):
    def __init__(self, config: GPTQConfig, zero_convention: ZeroConvention):
        super().__init__(config.bits, config.group_size)
        self.config = config
        self.zero_convention = zero_convention

    def checkpoint_params(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales", "g_idx")

    def create_weights(self, layer, input_size, output_sizes, params_dtype):
        out, f = sum(output_sizes), pack_factor(self.bits)
        _, groups = self.groups(input_size, layer.prefix)
        if input_size % f or any(size % f for size in output_sizes):
            raise ValueError(f"{layer.prefix}: sizes {input_size} x {output_sizes} are not "
                             f"multiples of the {f} codes per int32")
        layer.qweight = new_parameter((input_size // f, out), torch.int32, input_dim=0,
                                      output_dim=1, packed_dim=0, pack_factor=f)
        layer.qzeros = new_parameter((groups, out // f), torch.int32, input_dim=0,
                                     output_dim=1, packed_dim=1, pack_factor=f)
        layer.scales = new_parameter((groups, out), params_dtype, input_dim=0, output_dim=1)
        layer.g_idx = g_idx_parameter(layer, input_size)

    def decode(self, layer) -> Decoded:
        codes = unpack_int32(layer.qweight.data, self.bits, dim=0).t()            # (N, K)
        stored = unpack_int32(layer.qzeros.data, self.bits, dim=1)               # (G, N)
        offset = self.zero_convention.resolve(stored, layer.prefix)
        scales = layer.scales.data.t()                                           # (N, G)
        zeros = (stored + offset).t().to(scales.dtype)                           # (N, G)
        return Decoded(codes, scales, zeros, layer.g_idx.data.to(torch.int64))
