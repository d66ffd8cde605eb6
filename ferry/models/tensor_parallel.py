"""Tensor parallelism (Megatron style) without new layers: a rank-local config plus wrapped methods.

Each rank builds the ordinary model from a *rank-local* copy of the HF config (its share
of the attention heads, KV heads, MLP width and vocabulary), so every layer is created
at its local size by its usual ``WeightMethods``. What TP changes is wrapped around the
chosen methods (``TensorParallelWeightMethods``), by the layer's checkpoint name:

- column-parallel (``qkv_proj``, ``gate_up_proj``): each rank holds a slice of the
  outputs (its heads; its half of gate and up); no communication;
- row-parallel (``o_proj``, ``down_proj``): each rank holds a slice of the inputs; the
  partial products are summed with one all-reduce, then the (replicated) bias is added;
- vocab-parallel embedding: each rank holds a slice of the rows; a token outside it
  reads zeros, and an all-reduce sums the one non-zero row;
- vocab-parallel LM head: each rank computes its slice of the logits and an all-gather
  gives every rank all of them, bit-identical, so every rank samples the same token
  with the same seeded generator (no broadcast of tokens; placeholders stay in step).

KV heads split across ranks; with fewer KV heads than ranks each is replicated on
``tp_size / num_kv_heads`` ranks (one per rank). The loader (``sharded_loader.py``)
reads each rank's slice from the checkpoint, from the layout attributes of each
parameter (``output_dim`` / ``input_dim`` / ``packed_dim`` / ``pack_factor``) and the
``tp_kind`` recorded on the layer here, with no knowledge of the weight format.
"""
from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ferry.distributed.collectives import tp_all_gather, tp_all_reduce
from ferry.distributed.state import ParallelContext
from ferry.layers.embedding_method import EmbeddingMethod
from ferry.layers.linear_method import LinearMethod
from ferry.layers.weight_methods import UNQUANTIZED, WeightMethods

COLUMN, ROW, VOCAB = "column", "row", "vocab"
# The last part of a layer's checkpoint prefix -> how it is split.
TP_PLAN: dict[str, str] = {
    "qkv_proj": COLUMN, "gate_up_proj": COLUMN,
    "o_proj": ROW, "down_proj": ROW,
    "embed_tokens": VOCAB, "lm_head": VOCAB,
}


def tp_kind(prefix: str) -> str | None:
    """How the layer at ``prefix`` is split (None: replicated)."""
    return TP_PLAN.get(prefix.rsplit(".", 1)[-1])


def local_kv_heads(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds: a share, or one replicated head when there are fewer."""
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"num_key_value_heads={num_kv_heads} does not divide by "
                             f"tensor_parallel_size={tp_size}")
        return num_kv_heads // tp_size
    if tp_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size={tp_size} is not a multiple of "
                         f"num_key_value_heads={num_kv_heads}: KV heads cannot be replicated "
                         f"evenly")
    return 1


def padded_vocab(vocab_size: int, tp_size: int) -> int:
    """The vocabulary padded to a multiple of ``tp_size`` (padding rows are zeros)."""
    return -(-vocab_size // tp_size) * tp_size


def local_hf_config(hf_config: Any, tp_size: int) -> Any:
    """A copy of ``hf_config`` with this rank's share of heads, MLP width and vocabulary.

    ValueError naming the setting when a size does not divide by ``tp_size``.
    """
    local = copy.deepcopy(hf_config)
    if tp_size == 1:
        return local
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    for name, value in (("num_attention_heads", heads),
                        ("intermediate_size", hf_config.intermediate_size)):
        if value % tp_size:
            raise ValueError(f"{name}={value} does not divide by tensor_parallel_size={tp_size}")
    local.head_dim = head_dim   # explicit: hidden_size // local heads would be wrong
    local.num_attention_heads = heads // tp_size
    local.num_key_value_heads = local_kv_heads(kv_heads, tp_size)
    local.intermediate_size = hf_config.intermediate_size // tp_size
    local.vocab_size = padded_vocab(hf_config.vocab_size, tp_size) // tp_size
    return local


class RowParallelMethod(LinearMethod):
    """The inner method on this rank's input slice, one all-reduce, then the full bias."""

    def __init__(self, inner: LinearMethod, ctx: ParallelContext):
        self.inner, self.ctx = inner, ctx

    def __getattr__(self, name: str) -> Any:   # the inner method's own attributes
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def create_weights(self, layer, input_size, output_sizes, params_dtype) -> None:
        group_size = getattr(self.inner, "group_size", None)
        if isinstance(group_size, int) and group_size > 0 and input_size % group_size:
            raise ValueError(f"{layer.prefix}: this rank's {input_size} inputs are not a "
                             f"multiple of the quantization group size {group_size}; use a "
                             f"tensor_parallel_size that keeps whole groups on each rank")
        # where this rank's inputs sit in the whole layer (ferry.layers.linear_method.input_part)
        layer.tp_input_part = (self.ctx.tp_rank * input_size, self.ctx.tp_size * input_size)
        self.inner.create_weights(layer, input_size, output_sizes, params_dtype)

    def process_weights_after_loading(self, layer) -> None:
        self.inner.process_weights_after_loading(layer)

    adds_lora = True   # the partial LoRA delta joins the partial product: one all-reduce

    def apply(self, layer, x, bias):
        out = self.inner.apply(layer, x, None)                        # (T, out), this rank's part
        if layer.lora is not None:
            out = layer.lora.apply(x, out)
        out = tp_all_reduce(self.ctx, out)                            # (T, out), summed
        return out if bias is None else out + bias


class VocabParallelMethod(EmbeddingMethod):
    """This rank's rows of the table: masked lookup + all-reduce; head slice + all-gather."""

    def __init__(self, inner: EmbeddingMethod, ctx: ParallelContext, vocab_size: int):
        self.inner, self.ctx, self.vocab_size = inner, ctx, vocab_size

    def __getattr__(self, name: str) -> Any:   # the inner method's own attributes
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def create_weights(self, layer, num_embeddings, embedding_dim, params_dtype) -> None:
        self.inner.create_weights(layer, num_embeddings, embedding_dim, params_dtype)

    def process_weights_after_loading(self, layer) -> None:
        self.inner.process_weights_after_loading(layer)

    def embedding(self, layer, input_ids):
        rows = layer.vocab_size                                    # this rank's rows
        local = input_ids - self.ctx.tp_rank * rows                # (T,)
        outside = (local < 0) | (local >= rows)
        out = self.inner.embedding(layer, local.masked_fill(outside, 0))   # (T, hidden)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return tp_all_reduce(self.ctx, out)

    def apply(self, layer, hidden, bias=None):
        local = self.inner.apply(layer, hidden, bias)               # (N, V / tp)
        return tp_all_gather(self.ctx, local, dim=-1)[..., :self.vocab_size]   # (N, V)


class TensorParallelWeightMethods:
    """Wraps a ``WeightMethods``: the same method per layer, split as ``TP_PLAN`` says.

    Records ``layer.tp_kind`` (and, for QKV with replicated KV heads,
    ``layer.tp_replicated_shards``) for the sharded loader.
    """

    def __init__(self, inner: WeightMethods | None, ctx: ParallelContext, vocab_size: int,
                 kv_replicated: bool):
        self.inner = inner or UNQUANTIZED
        self.ctx, self.vocab_size, self.kv_replicated = ctx, vocab_size, kv_replicated

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod:
        method = self.inner.linear_method(prefix, layer)
        layer.tp_kind = tp_kind(prefix)
        if prefix.endswith("qkv_proj") and self.kv_replicated:
            layer.tp_replicated_shards = ("k", "v")
        return RowParallelMethod(method, self.ctx) if layer.tp_kind == ROW else method

    def embedding_method(self, prefix: str, layer: nn.Module) -> EmbeddingMethod:
        method = self.inner.embedding_method(prefix, layer)
        layer.tp_kind = VOCAB
        return VocabParallelMethod(method, self.ctx, self.vocab_size)


def tensor_parallel_methods(inner: WeightMethods | None, ctx: ParallelContext,
                            hf_config: Any) -> WeightMethods | None:
    """The methods a rank builds its model with (``inner`` itself without TP)."""
    if ctx.tp_size == 1:
        return inner
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    return TensorParallelWeightMethods(inner, ctx, hf_config.vocab_size,
                                       kv_replicated=kv_heads < ctx.tp_size)


def rank_weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (tied tensors once)."""
    seen: dict[int, int] = {}
    for param in model.parameters():
        seen[id(param)] = param.numel() * param.element_size()
    return sum(seen.values())
