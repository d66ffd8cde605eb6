"""Model definitions and weight loading.

``ferry.checkpoint`` finds a checkpoint and reads its config; ``get_model`` then gives a
``CausalLM`` with its weights loaded; ``supported_architectures`` lists what ferry can run.
"""
from ferry.models.common import CausalLM, DecoderOptions
from ferry.models.loader import get_model
from ferry.models.registry import get_model_class, supported_architectures

__all__ = ["CausalLM", "DecoderOptions", "get_model", "get_model_class", "supported_architectures"]
