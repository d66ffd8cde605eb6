"""From a checkpoint's ``quantization_config`` (or a forced ``quant_type``) to ``WeightMethods``.

``resolve_quantization(hf_config, quant_type)`` returns what the model loader needs (the
``WeightMethods``, None for an unquantized model) and the ``quant_type`` label the
metrics and ``/v1/models`` report. A format, bit width or layout ferry does not read is
refused here, naming the key and its value, before any weight is loaded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ferry.quant.awq import AWQConfig, AWQWeightMethods
from ferry.quant.fp8 import FP8Config
from ferry.quant.gptq import GPTQConfig, GPTQWeightMethods
from ferry.quant.kv_scales import attach_kv_scales
from ferry.quant.selection import FormatWeightMethods, one_choice

logger = logging.getLogger(__name__)

QUANT_TYPES = ("auto", "none", "gptq_int4", "gptq_int8", "awq_int4", "int4", "int8", "fp8")
ON_LOAD_TYPES = ("int4", "int8", "fp8")   # quantized while loading an unquantized checkpoint


@dataclass
class ResolvedQuant:
    """The weight methods to build the model with, and the label of what they are."""

    weight_methods: Any | None       # a WeightMethods; None: every layer unquantized
    quant_type: str                  # "none", "gptq_int4", ..., the metrics' label
    kv_cache_fp8: bool = False       # the checkpoint declares an FP8 KV cache with scales


class FP8WeightMethods(FormatWeightMethods):
    label = "fp8"

    def __init__(self, config: FP8Config):
        self.config = config

    def quantized_method(self, prefix, layer):
        return self.config.method() if one_choice(prefix, self.config.quantizes) else None

    def prepare_model(self, model) -> None:
        if self.config.kv_cache_scheme is not None:
            attach_kv_scales(model)


def _gptq(raw):
    return GPTQWeightMethods(GPTQConfig(raw))


def _awq(raw):
    return AWQWeightMethods(AWQConfig(raw))


def _compressed_tensors(raw):
    from ferry.quant.compressed_tensors import CompressedTensorsConfig, CompressedTensorsWeightMethods
    return CompressedTensorsWeightMethods(CompressedTensorsConfig(raw))


def _fp8(raw):
    return FP8WeightMethods(FP8Config(raw))


# quant_method in config.json -> builder of its WeightMethods
CHECKPOINT_FORMATS = {"gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed_tensors,
                      "fp8": _fp8}


LM_HEAD_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "int8": torch.int8}


def on_load_methods(quant_type: str, int8_activations: bool = False,
                    lm_head_dtype: str = "auto"):
    """WeightMethods that quantize an unquantized checkpoint while it loads."""
    if quant_type == "fp8":
        check_lm_head_dtype(lm_head_dtype, "quant_type=fp8")
        from ferry.quant.on_load_fp8 import OnLoadFP8WeightMethods
        return OnLoadFP8WeightMethods()
    from ferry.quant.on_load_rtn import RtnWeightMethods
    return RtnWeightMethods(bits=8 if quant_type == "int8" else 4,
                            head_dtype=_head_dtype(lm_head_dtype),
                            int8_activations=int8_activations)


def _head_dtype(lm_head_dtype: str) -> torch.dtype | None:
    if lm_head_dtype not in LM_HEAD_DTYPES:
        raise ValueError(f"lm_head_dtype={lm_head_dtype!r} is not one of "
                         f"{', '.join(LM_HEAD_DTYPES)}")
    return LM_HEAD_DTYPES[lm_head_dtype]


def check_lm_head_dtype(lm_head_dtype: str, loading: str) -> None:
    """Only on-load int8/int4 choose the head's precision; refuse the key elsewhere rather
    than ignore it."""
    if _head_dtype(lm_head_dtype) is not None:
        raise ValueError(f"lm_head_dtype={lm_head_dtype} applies to quant_type int8 or int4 "
                         f"on an unquantized checkpoint (quantized while loading), not to "
                         f"{loading}")


def resolve_quantization(hf_config: Any, quant_type: str = "auto",
                         int8_activations: bool = False,
                         lm_head_dtype: str = "auto") -> ResolvedQuant:
    """The checkpoint's format, checked against a forced ``quant_type``; ValueError if
    unsupported. ``int8_activations`` (the ``cpu_int8_activations`` key) reaches the
    integer linears that have an int8-activation path (``WNA16LinearMethod``, RTN);
    ``lm_head_dtype`` (auto, bfloat16, int8) the head of on-load int8/int4."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not one of {', '.join(QUANT_TYPES)}")
    raw = getattr(hf_config, "quantization_config", None)
    if raw is not None and not isinstance(raw, dict):
        raw = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
    if not raw:
        if quant_type in ON_LOAD_TYPES:
            methods = on_load_methods(quant_type, int8_activations, lm_head_dtype)
            if lm_head_dtype != "auto" and getattr(hf_config, "tie_word_embeddings", False):
                logger.warning("lm_head_dtype=%s: this model's LM head is tied to its "
                               "embeddings, which are looked up by token; it stays as loaded",
                               lm_head_dtype)
            return ResolvedQuant(methods, quant_type)
        check_lm_head_dtype(lm_head_dtype, f"quant_type={quant_type}")
        if quant_type in ("auto", "none"):
            return ResolvedQuant(None, "none")
        raise ValueError(f"quant_type={quant_type!r} needs a checkpoint quantized in that format "
                         "(its config.json has no quantization_config); make one with "
                         "`ferry quantize` or pick int8, int4 or fp8 to quantize on load")
    method = str(raw.get("quant_method", "")).lower()
    builder = CHECKPOINT_FORMATS.get(method)
    if builder is None:
        raise ValueError(f"quantization_config.quant_method={method!r} is not supported; ferry "
                         f"loads {', '.join(CHECKPOINT_FORMATS)}")
    check_lm_head_dtype(lm_head_dtype, f"a {method} checkpoint")
    methods = builder(raw)
    methods.int8_activations = int8_activations
    if quant_type not in ("auto", methods.label):
        raise ValueError(f"quant_type={quant_type!r} does not match the checkpoint, which is "
                         f"{method} ({methods.label}); use quant_type auto")
    kv_fp8 = getattr(getattr(methods, "config", None), "kv_cache_scheme", None) is not None
    logger.info("quantized checkpoint: %s -> quant_type %s%s", method, methods.label,
                ", FP8 KV scales" if kv_fp8 else "")
    return ResolvedQuant(methods, methods.label, kv_fp8)
