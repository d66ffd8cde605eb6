"""Which models and steps run their decoder layers as one fused kernel call.

``DecoderStackRunner`` looks once (on the first step, when the weights are loaded and in
their run-time layout) at whether the model's layers are the plain float32 ones the fused
stack implements (``kernels.decoder_stack``), and per step at whether the step needs
anything the layers do besides their kernels. The layer-by-layer forward stays the
reference and runs whenever the answer is no:

- at build: a projection whose ``LinearMethod`` has no ``fused_projection`` (FP8, W8A8,
  act-order splits, a row-parallel shard), Qwen3's q/k norm, a backend other than the
  C++ one, a dtype other than float32;
- per step: more rows than the kernels take (long prefill chunks), an FP8 KV cache, a
  traced request (the trace reads each layer's scores), LoRA requests in the step,
  padding rows.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ferry import kernels
from ferry.kernels.attn_metadata import AttentionMetadata
from ferry.kernels.decoder_stack_spec import LayerTensors, StackShape

_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


class DecoderStackRunner:
    """The fused stack of one ``DecoderModel``'s layers, built on first use (or not)."""

    def __init__(self) -> None:
        self._stack: Any = None
        self._built = False

    def run(self, layers: nn.ModuleList, hidden: torch.Tensor, positions: torch.Tensor,
            kv_caches: list[torch.Tensor], meta: AttentionMetadata
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hidden, residual) after every layer, or None when this step must run layer by
        layer."""
        if not self._built:
            self._stack, self._built = _build(layers), True
        if self._stack is None or not _step_fits(self._stack, layers, hidden, kv_caches, meta):
            return None
        return self._stack.run(hidden, positions, kv_caches, meta)


def _step_fits(stack: Any, layers: nn.ModuleList, hidden: torch.Tensor,
               kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> bool:
    tokens = hidden.shape[0]
    # LoRA may be attached after the first step: its shared batch is looked up every time.
    lora = layers[0].self_attn.qkv_proj.lora
    lora_step = lora is not None and lora.batch.mapping is not None
    return (not lora_step and meta.trace_rows is None and hidden.dtype == torch.float32
            and sum(meta.query_lens_cpu) == tokens and stack.takes(tokens, kv_caches))


def _build(layers: nn.ModuleList) -> Any:
    if not len(layers) or not all(_plain(layer) for layer in layers):
        return None
    first = layers[0]
    same = {(layer.input_layernorm.eps, layer.post_attention_layernorm.eps,
             layer.self_attn.attn.scale) for layer in layers}
    if len(same) != 1 or first.input_layernorm.eps != first.post_attention_layernorm.eps:
        return None
    attn = first.self_attn
    shape = StackShape(hidden=first.input_layernorm.weight.shape[0], num_heads=attn.num_heads,
                       num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim,
                       intermediate=first.mlp.down_proj.input_size,
                       eps=float(first.input_layernorm.eps), scale=float(attn.attn.scale))
    tensors = [_layer_tensors(layer) for layer in layers]
    return kernels.decoder_stack(shape, tensors, attn.rotary_emb.cos_sin_cache)


def _plain(layer: nn.Module) -> bool:
    """Projections the stack runs as their methods do, no q/k norm."""
    if layer.self_attn.q_norm is not None:
        return False
    for name in _PROJECTIONS:
        linear = layer.get_submodule(name)
        if linear.weight_method.adds_lora or linear.weight_method.fused_projection(linear) is None:
            return False
    return True


def _layer_tensors(layer: nn.Module) -> LayerTensors:
    attn, mlp = layer.self_attn, layer.mlp

    def projection(linear):
        return linear.weight_method.fused_projection(linear)

    return LayerTensors(
        input_norm=layer.input_layernorm.weight.detach(), qkv=projection(attn.qkv_proj),
        o=projection(attn.o_proj), post_norm=layer.post_attention_layernorm.weight.detach(),
        gate_up=projection(mlp.gate_up_proj), down=projection(mlp.down_proj),
        sliding_window=attn.attn.sliding_window)
