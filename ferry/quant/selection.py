"""Which checkpoint modules a ferry layer stands for, and the per-layer choice they imply.

ferry merges q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``; a quantization
config names the checkpoint's modules. A merged layer is quantized when all its shards
are, unquantized when none is; a mix cannot be merged and is refused.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

from ferry.layers.embedding_method import EmbeddingMethod, UnquantizedEmbeddingMethod
from ferry.layers.linear_method import LinearMethod, UnquantizedLinearMethod

# ferry's merged module -> the checkpoint modules it holds, in shard order
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

T = TypeVar("T")


def checkpoint_modules(prefix: str) -> list[str]:
    """The checkpoint module names behind the ferry layer at ``prefix``."""
    head, _, last = prefix.rpartition(".")
    shards = FUSED_MODULES.get(last)
    if shards is None:
        return [prefix]
    return [f"{head}.{name}" if head else name for name in shards]


def shard_index(layer: nn.Module, shard_id) -> int:
    """Position of ``shard_id`` among the layer's merged outputs (0 for a plain linear)."""
    offsets = getattr(layer, "shard_offsets", None)
    if not offsets or shard_id is None:
        return 0
    return list(offsets).index(shard_id)


def one_choice(prefix: str, choose: Callable[[str], T]) -> T:
    """``choose(name)`` for every checkpoint module of the layer; they must agree."""
    names = checkpoint_modules(prefix)
    choices = [choose(name) for name in names]
    if any(c != choices[0] for c in choices[1:]):
        detail = ", ".join(f"{n}: {c}" for n, c in zip(names, choices))
        raise ValueError(f"quantization_config treats the modules ferry merges into {prefix} "
                         f"differently ({detail}); ferry cannot load such a checkpoint")
    return choices[0]


class FormatWeightMethods:
    """``WeightMethods`` of a quantized checkpoint: quantized linears where the format says,
    everything else (embeddings, ``lm_head``, skipped modules) unquantized.

    Subclasses implement ``quantized_method(prefix, layer)`` (None: this layer is left in
    the model dtype) and may override ``prepare_model`` (extra tensors such as KV scales).
    """

    label = "none"   # the metrics' quant_type
    # cpu_int8_activations: given to each quantized method that has the option
    int8_activations = False

    def quantized_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        raise NotImplementedError

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod:
        method = self.quantized_method(prefix, layer)
        if method is None:
            return UnquantizedLinearMethod()
        if self.int8_activations and hasattr(method, "int8_activations"):
            method.int8_activations = True
        return method

    def embedding_method(self, prefix: str, layer: nn.Module) -> EmbeddingMethod:
        return UnquantizedEmbeddingMethod()

    def prepare_model(self, model: nn.Module) -> None:
        """Called by the loader after the model is built, before its weights load."""
