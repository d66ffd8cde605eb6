"""Model definitions and checkpoint loading.

``resolve_model_path`` -> ``load_hf_config`` -> ``get_model`` gives a ``CausalLM`` with
its weights loaded; ``supported_architectures`` lists what ferry can run.
"""
from ferry.models.common import CausalLM, DecoderOptions
from ferry.models.loader import get_model, load_hf_config, resolve_model_path
from ferry.models.registry import get_model_class, supported_architectures

__all__ = ["CausalLM", "DecoderOptions", "get_model", "get_model_class", "load_hf_config",
           "resolve_model_path", "supported_architectures"]
