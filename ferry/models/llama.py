"""Llama (1/2/3/3.1) and Mistral: the shared decoder with Llama's options."""
from __future__ import annotations

from typing import Any

from ferry.models.common import CausalLM, DecoderOptions, base_options


class LlamaForCausalLM(CausalLM):
    """Llama: optional attention/MLP biases, optional explicit head_dim, llama3 rope scaling."""

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return base_options(hf_config, qkv_bias=attention_bias, o_bias=attention_bias,
                            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))


class MistralForCausalLM(CausalLM):
    """Mistral: Llama without biases, and ``sliding_window`` (when set) on every layer."""

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        window = getattr(hf_config, "sliding_window", None)
        windows = (window,) * hf_config.num_hidden_layers if window else ()
        return base_options(hf_config, layer_sliding_windows=windows)
