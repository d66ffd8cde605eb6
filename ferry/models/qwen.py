"""Qwen2 / Qwen2.5 and Qwen3: the shared decoder with Qwen's options."""
from __future__ import annotations

from typing import Any

from ferry.models.common import CausalLM, DecoderOptions, base_options, layer_sliding_windows


class Qwen2ForCausalLM(CausalLM):
    """Qwen2: bias on q/k/v (not o), tied embeddings on small models, optional sliding window."""

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        return base_options(hf_config, qkv_bias=True,
                            layer_sliding_windows=layer_sliding_windows(hf_config))


class Qwen3ForCausalLM(CausalLM):
    """Qwen3: per-head RMSNorm on q and k before rotary, explicit head_dim, optional biases."""

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return base_options(hf_config, qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True,
                            layer_sliding_windows=layer_sliding_windows(hf_config))
