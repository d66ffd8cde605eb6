"""Which ferry class implements each HF architecture (``config.architectures[0]``)."""
from __future__ import annotations

import importlib
from typing import Any

# HF architecture name -> "module:class". Imported lazily so unused models cost nothing.
_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "ferry.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "ferry.models.llama:MistralForCausalLM",
    "Qwen2ForCausalLM": "ferry.models.qwen:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "ferry.models.qwen:Qwen3ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_model_class(hf_config: Any) -> type:
    """The ``CausalLM`` subclass for the config's architecture; ValueError when unsupported."""
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise ValueError("the model config names no architecture ('architectures' is empty); "
                         f"ferry supports: {', '.join(supported_architectures())}")
    name = architectures[0]
    if name not in _ARCHITECTURES:
        raise ValueError(f"unsupported model architecture {name!r}; "
                         f"ferry supports: {', '.join(supported_architectures())}")
    module_name, class_name = _ARCHITECTURES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
