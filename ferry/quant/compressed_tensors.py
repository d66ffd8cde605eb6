"""compressed-tensors checkpoints (what llm-compressor writes), read with its own schema.

The ``quantization_config`` is parsed by ``compressed_tensors.QuantizationConfig``; each
checkpoint module gets the scheme of the config group whose ``targets`` match it (the
class ``Linear``, an exact name or a ``re:`` pattern) unless ``ignore`` matches it. Formats:

- ``pack-quantized`` W4A16 / W8A16: ``weight_packed`` (N, K * bits / 32) int32 packed along
  the inputs, ``weight_scale`` (N, G), for asymmetric weights ``weight_zero_point``
  (N * bits / 32, G) packed along the outputs, ``weight_shape``; unpacked with the
  package's ``unpack_from_int32`` (signed codes, offset 2**(bits-1));
- ``int-quantized`` W8A8: int8 weights, dynamic per-token (or static) int8 activations;
- ``float-quantized`` FP8: per-tensor or per-channel weight scales, static ``input_scale``
  or dynamic activations, or weight-only;
- ``kv_cache_scheme``: per-layer ``self_attn.k_scale`` / ``v_scale`` (``ferry.quant.kv_scales``).

Anything else is refused, naming the scheme.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ferry.layers.linear_method import LinearMethod, input_part
from ferry.layers.parameter import new_parameter
from ferry.quant.fp8 import FP8LinearMethod
from ferry.quant.kv_scales import attach_kv_scales
from ferry.quant.selection import FormatWeightMethods, one_choice
from ferry.quant.w8a8 import Int8LinearMethod
from ferry.quant.wna16 import Decoded, WNA16LinearMethod, g_idx_parameter

INSTALL_HINT = "pip install 'ferry[quant]' (the compressed-tensors package)"


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ValueError(f"this checkpoint is in the compressed-tensors format: {INSTALL_HINT}") from None
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_name
    return QuantizationConfig, match_name


class CompressedTensorsConfig:
    def __init__(self, raw: dict[str, Any]):
        QuantizationConfig, self._match_name = _ct()
        raw, self.group_actorder = _without_removed_actorder(raw)
        try:
            self.config = QuantizationConfig.model_validate(raw)
        except Exception as exc:   # pydantic's errors name the field
            raise ValueError(f"quantization_config (compressed-tensors) is not valid: {exc}") from None
        if self.config.format in ("marlin-24", "sparse-24-bitmask", "sparse-bitmask"):
            raise ValueError(f"quantization_config.format={self.config.format!r} is not supported")
        self.groups = {name: s for name, s in self.config.config_groups.items()}
        self.ignore = list(self.config.ignore or [])
        self.kv_cache_scheme = self.config.kv_cache_scheme
        if self.kv_cache_scheme is not None:
            kv = self.kv_cache_scheme
            if kv.type != "float" or kv.num_bits != 8 or kv.strategy not in (None, "tensor"):
                raise ValueError(f"quantization_config.kv_cache_scheme={kv.model_dump()} is not "
                                 "supported (ferry reads FP8 per-tensor K/V scales)")
        self.label = self._label()

    def scheme_of(self, name: str):
        """The scheme that quantizes checkpoint module ``name``, or None (left unquantized)."""
        if name.endswith("lm_head") or any(self._match_name(name, ign) for ign in self.ignore):
            return None
        matches = [(group, s) for group, s in self.groups.items()
                   if any(t == "Linear" or self._match_name(name, t) for t in s.targets)]
        if len(matches) > 1:
            raise ValueError(f"quantization_config.config_groups {[g for g, _ in matches]} all "
                             f"target {name}; ferry needs one scheme per module")
        return matches[0] if matches else None

    def format_of(self, scheme) -> str:
        return scheme.format or self.config.format

    def method(self, group: str, scheme, prefix: str) -> LinearMethod:
        fmt, weights, inputs = self.format_of(scheme), scheme.weights, scheme.input_activations
        where = f"quantization_config.config_groups.{group}"
        if weights is None or scheme.output_activations is not None:
            raise ValueError(f"{where}: only weight (and input) quantization is supported")
        if fmt == "pack-quantized" and weights.type == "int" and inputs is None:
            if weights.strategy not in ("group", "channel") or weights.num_bits not in (4, 8):
                raise ValueError(f"{where}.weights: strategy {weights.strategy!r} with "
                                 f"num_bits {weights.num_bits} is not supported for pack-quantized")
            return PackedLinearMethod(weights, self.group_actorder.get(group, False))
        if fmt == "int-quantized" and weights.type == "int" and inputs is not None:
            _check(where, weights.num_bits == 8 and weights.symmetric and inputs.num_bits == 8
                   and inputs.type == "int" and inputs.symmetric, "int8 symmetric W8A8")
            return Int8LinearMethod(weights.strategy, _activation(where, inputs, ("token",)))
        if fmt in ("float-quantized", "naive-quantized") and weights.type == "float":
            _check(where, weights.num_bits == 8, "FP8 weights")
            if weights.strategy == "block":
                block = tuple(weights.block_structure)
                act = None if inputs is None else _activation(where, inputs, ("group",))
                return FP8LinearMethod("block", act, block)
            act = None if inputs is None else _activation(where, inputs, ("token", "tensor"))
            return FP8LinearMethod(weights.strategy, act)
        raise ValueError(f"{where}: format {fmt!r} with {weights.type} weights"
                         f"{' and activations' if inputs else ''} is not supported")

    def _label(self) -> str:
        for scheme in self.groups.values():
            w = scheme.weights
            if w is not None:
                return "fp8" if w.type == "float" else f"int{w.num_bits}"
        return "none"


def _check(where: str, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"{where}: ferry supports {what} in this format")


def _activation(where: str, inputs, allowed: tuple[str, ...]) -> str:
    """The activation scheme as ferry names it: "static", or the dynamic strategy."""
    if not inputs.dynamic:
        if inputs.strategy != "tensor":
            raise ValueError(f"{where}.input_activations: static {inputs.strategy!r} scales are "
                             "not supported (static per-tensor only)")
        return "static"
    if inputs.strategy not in allowed:
        raise ValueError(f"{where}.input_activations: dynamic strategy {inputs.strategy!r} is "
                         f"not supported here ({', '.join(allowed)})")
    return inputs.strategy


def _without_removed_actorder(raw: dict) -> tuple[dict, dict[str, bool]]:
    """Older checkpoints say ``actorder: "group"`` (a stored ``weight_g_idx``), which the
    package's current schema rejects: note it per group and parse the rest."""
    raw = dict(raw)
    groups, flagged = {}, {}
    for name, scheme in (raw.get("config_groups") or {}).items():
        weights = dict(scheme.get("weights") or {}) if isinstance(scheme, dict) else None
        if weights is not None and str(weights.get("actorder")).lower() == "group":
            weights.pop("actorder")
            scheme = {**scheme, "weights": weights}
            flagged[name] = True
        groups[name] = scheme
    raw["config_groups"] = groups
    raw.setdefault("quant_method", "compressed-tensors")
    return raw, flagged


class CompressedTensorsWeightMethods(FormatWeightMethods):
    def __init__(self, config: CompressedTensorsConfig):
        self.config = config
        self.label = config.label

    def quantized_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        choice = one_choice(prefix, self.config.scheme_of)
        if choice is None:
            return None
        group, scheme = choice
        return self.config.method(group, scheme, prefix)

    def prepare_model(self, model: nn.Module) -> None:
        if self.config.kv_cache_scheme is not None:
            attach_kv_scales(model)


class PackedLinearMethod(WNA16LinearMethod):
    """``pack-quantized`` integer weights (W4A16 / W8A16), group or channel scales."""

    def __init__(self, weights, has_g_idx: bool):
        group = weights.group_size if weights.strategy == "group" else -1
        super().__init__(weights.num_bits, group)
        self.symmetric = weights.symmetric
        self.has_g_idx = has_g_idx

    def checkpoint_params(self) -> tuple[str, ...]:
        names = ("weight_packed", "weight_scale", "weight_shape")
        names += () if self.symmetric else ("weight_zero_point",)
        return names + (("weight_g_idx",) if self.has_g_idx else ())

    def create_weights(self, layer, input_size, output_sizes, params_dtype):
        out, f = sum(output_sizes), 32 // self.bits
        _, groups = self.groups(input_size, layer.prefix)
        if input_size % f or (not self.symmetric and any(s % f for s in output_sizes)):
            raise ValueError(f"{layer.prefix}: sizes {input_size} x {output_sizes} are not "
                             f"multiples of the {f} codes per int32")
        layer.weight_packed = new_parameter((out, input_size // f), torch.int32, output_dim=0,
                                            input_dim=1, packed_dim=1, pack_factor=f)
        layer.weight_scale = new_parameter((out, groups), params_dtype, output_dim=0, input_dim=1)
        if not self.symmetric:
            layer.weight_zero_point = new_parameter((out // f, groups), torch.int32, output_dim=0,
                                                    input_dim=1, packed_dim=0, pack_factor=f)
        layer.weight_shape = new_parameter((2,), torch.int64, output_dim=None, input_dim=None)
        layer.weight_shape.weight_loader = _shape_checker(input_part(layer)[1])
        if self.has_g_idx:
            layer.weight_g_idx = g_idx_parameter(layer, input_size, "weight_g_idx")

    def decode(self, layer) -> Decoded:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        offset = 2 ** (self.bits - 1)
        n, k = layer.output_size, layer.input_size
        signed = unpack_from_int32(layer.weight_packed.data, self.bits, torch.Size((n, k)))
        scales = layer.weight_scale.data                                        # (N, G)
        if self.symmetric:
            zeros = torch.full_like(scales, offset)
        else:
            zp = unpack_from_int32(layer.weight_zero_point.data, self.bits,
                                   torch.Size(scales.shape), packed_dim=0)      # (N, G) signed
            zeros = (zp.to(torch.int32) + offset).to(scales.dtype)
        g_idx = layer.weight_g_idx.data.to(torch.int64) if self.has_g_idx else None
        return Decoded(signed.to(torch.int32) + offset, scales, zeros, g_idx)


def _shape_checker(input_size: int):
    """The stored shape's inputs must be the whole layer's (``input_size``; a row-parallel
    rank holds a slice of them)."""
    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.numel() != 2 or int(loaded[-1]) != input_size:
            raise ValueError(f"weight_shape {loaded.tolist()} does not match the layer's "
                             f"{input_size} inputs")
        param.data.copy_(loaded.reshape(2))
    return load
