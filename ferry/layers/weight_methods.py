"""Which weight method each layer uses, chosen from its checkpoint prefix, and the post-load pass.

A layer is built with its full checkpoint prefix (``model.layers.3.mlp.down_proj``,
``model.layers.0.self_attn.qkv_proj``, ``model.embed_tokens``, ``lm_head``) and a
``WeightMethods``; it asks for its method once, in its ``__init__``, and keeps it as
``layer.weight_method``. A quantization config implements ``WeightMethods`` (e.g.
quantized linears except the ones its config leaves out, unquantized embedding/head).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ferry.layers.embedding_method import EmbeddingMethod, UnquantizedEmbeddingMethod
from ferry.layers.linear_method import LinearMethod, UnquantizedLinearMethod


class WeightMethods(Protocol):
    """Chooses the weight method of every layer from its full checkpoint prefix.

    Called once per layer, from the layer's ``__init__`` before it has parameters; the
    layer's sizes (``input_size``, ``output_size``, ``vocab_size``...) and ``prefix``
    are set by then. Returns a method for that one layer (it may keep per-layer state).
    """

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod: ...

    def embedding_method(self, prefix: str, layer: nn.Module) -> EmbeddingMethod: ...


class UnquantizedWeightMethods:
    """Every layer unquantized, in the model dtype (the default)."""

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod:
        return UnquantizedLinearMethod()

    def embedding_method(self, prefix: str, layer: nn.Module) -> EmbeddingMethod:
        return UnquantizedEmbeddingMethod()


UNQUANTIZED = UnquantizedWeightMethods()


def child_prefix(prefix: str, name: str) -> str:
    """The checkpoint prefix of sub-module ``name`` of the module at ``prefix``."""
    return f"{prefix}.{name}" if prefix else name


@torch.no_grad()
def process_weights_after_loading(model: nn.Module) -> None:
    """Run every layer's ``weight_method.process_weights_after_loading`` once, after loading.

    A module whose parameters all belong to a module processed before it (a head tied to
    the embedding, visited after it) shares that module's weights and method: processing
    them again would repeat the step on the same tensors, so it is skipped.
    """
    processed: set[int] = set()
    for module in model.modules():
        method = getattr(module, "weight_method", None)
        if method is None:
            continue
        params = {id(p) for p in module.parameters(recurse=False)}
        if params and params <= processed:
            continue
        method.process_weights_after_loading(module)
        processed |= params
