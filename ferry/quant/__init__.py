"""Quantized weights: one ``LinearMethod`` per checkpoint format, chosen from config.json.

``resolve_quantization`` (``registry.py``) reads ``quantization_config`` (or a forced
``quant_type``) and returns the ``WeightMethods`` the model loader builds each layer with.
Formats: ``gptq.py``, ``awq.py`` and ``compressed_tensors.py`` pack-quantized (integer
weight-only, all converted to one runtime layout in ``wna16.py`` and run by
``ferry.kernels.quant_linear.wna16_linear``), ``w8a8.py`` (int8 weights and activations),
``fp8.py`` (FP8 weights), ``kv_scales.py`` (per-layer K/V scales), ``on_load_fp8.py``
(FP8 while loading). ``quantize/`` is the ``ferry quantize`` tool.
"""
from ferry.quant.registry import QUANT_TYPES, ResolvedQuant, resolve_quantization

__all__ = ["QUANT_TYPES", "ResolvedQuant", "resolve_quantization"]
