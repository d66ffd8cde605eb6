"""Build this rank's part of a model: its tensor-parallel share of its pipeline stage's layers.

``build_rank_model`` returns a plain ``CausalLM`` for one stage (tensor parallel or not),
or a ``PipelineStage`` around the stage's layers when there are several stages. Stage
``p`` of ``P`` holds layers ``[p*L//P, (p+1)*L//P)``; the embedding lives on the first
stage and the head (and final norm) on the last, where they are used (a tied head is
the embedding's table, loaded on the last stage too).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ferry.distributed.state import ParallelContext
from ferry.layers.weight_methods import UNQUANTIZED, WeightMethods, process_weights_after_loading
from ferry.models.common import CausalLM
from ferry.models.loader import find_safetensors_files
from ferry.models.lora_plan import rank_lora_plan
from ferry.models.registry import get_model_class
from ferry.models.sharded_loader import load_rank_weights, stage_name_map
from ferry.models.tensor_parallel import local_hf_config, tensor_parallel_methods

_LAYER_PREFIX = re.compile(r"^(model\.layers\.)(\d+)(\..*|)$")


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> tuple[int, int]:
    """(first layer, number of layers) of stage ``pp_rank``."""
    if num_layers < pp_size:
        raise ValueError(f"pipeline_parallel_size={pp_size} is more than the model's "
                         f"{num_layers} layers")
    first = pp_rank * num_layers // pp_size
    return first, (pp_rank + 1) * num_layers // pp_size - first


def stage_hf_config(hf_config: Any, first: int, count: int) -> Any:
    """The config of a model made of layers ``[first, first + count)`` only."""
    local = copy.deepcopy(hf_config)
    local.num_hidden_layers = count
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        local.layer_types = list(layer_types)[first:first + count]
    if getattr(hf_config, "max_window_layers", None) is not None:
        local.max_window_layers = max(0, hf_config.max_window_layers - first)
    return local


def check_parallel_fit(hf_config: Any, tp_size: int, pp_size: int) -> None:
    """ValueError naming the setting when the model cannot be split this way (every rank
    would fail the same way: say it before starting any)."""
    for pp_rank in range(pp_size):
        first, count = stage_layers(hf_config.num_hidden_layers, pp_size, pp_rank)
        local_hf_config(stage_hf_config(hf_config, first, count), tp_size)


class StagePrefixMethods:
    """Chooses methods by the checkpoint's layer numbers on a stage whose layers count from 0
    (so a quantization config that names ``model.layers.17`` sees layer 17)."""

    def __init__(self, inner: WeightMethods, first: int):
        self.inner, self.first = inner, first

    def _global(self, prefix: str) -> str:
        match = _LAYER_PREFIX.match(prefix)
        if match is None:
            return prefix
        return f"{match.group(1)}{int(match.group(2)) + self.first}{match.group(3)}"

    def linear_method(self, prefix: str, layer: nn.Module):
        return self.inner.linear_method(self._global(prefix), layer)

    def embedding_method(self, prefix: str, layer: nn.Module):
        return self.inner.embedding_method(self._global(prefix), layer)


class PipelineStage(nn.Module):
    """One pipeline stage: its layers, plus the embedding (first) or norm and head (last).

    ``forward_stage`` takes the previous stage's (hidden, residual) and returns this
    stage's; ``forward`` (used by memory profiling) feeds zeros where a stage would
    receive activations and returns the hidden states only.
    """

    def __init__(self, lm: CausalLM, ctx: ParallelContext, vocab_size: int):
        super().__init__()
        self.lm = lm
        self.is_first, self.is_last = ctx.is_first_stage, ctx.is_last_stage
        self.num_layers, self.num_kv_heads, self.head_dim = lm.num_layers, lm.num_kv_heads, lm.head_dim
        self.hidden_size = lm.model.norm.weight.shape[0]
        self.vocab_size = vocab_size

    def forward_stage(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      kv_caches: list[torch.Tensor], attn_metadata: Any,
                      received: tuple[torch.Tensor, torch.Tensor] | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        decoder = self.lm.model
        if self.is_first:
            hidden, residual = decoder.embed_tokens(input_ids), None        # (T, hidden)
        else:
            hidden, residual = received                                     # (T, hidden) x 2
        for layer, kv_cache in zip(decoder.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        if self.is_last:
            hidden, _ = decoder.norm(hidden, residual)
            return hidden, None
        return hidden, residual

    def forward(self, input_ids, positions, kv_caches, attn_metadata) -> torch.Tensor:
        received = None
        if not self.is_first:
            zeros = torch.zeros(input_ids.shape[0], self.hidden_size,
                                dtype=self.lm.model.norm.weight.dtype, device=input_ids.device)
            received = (zeros, zeros.clone())
        return self.forward_stage(input_ids, positions, kv_caches, attn_metadata, received)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.is_last:   # profiling only: a stage without the head has no logits
            return torch.zeros(hidden.shape[0], self.vocab_size, device=hidden.device)
        return self.lm.compute_logits(hidden)


def build_rank_model(model_dir: Path, hf_config: Any, dtype: torch.dtype, device: torch.device,
                     ctx: ParallelContext, weight_methods: WeightMethods | None = None) -> nn.Module:
    """This rank's model on ``device``, its weights read from ``model_dir`` as slices."""
    model_cls = get_model_class(hf_config)
    first, count = stage_layers(hf_config.num_hidden_layers, ctx.pp_size, ctx.pp_rank)
    local = local_hf_config(stage_hf_config(hf_config, first, count), ctx.tp_size)
    if first:
        weight_methods = StagePrefixMethods(weight_methods or UNQUANTIZED, first)
    methods = tensor_parallel_methods(weight_methods, ctx, hf_config)
    with torch.device(device):
        lm = model_cls(local, dtype=dtype, weight_methods=methods)
    lm.vocab_size = hf_config.vocab_size            # logits are gathered to the full vocabulary
    skip = _drop_unused_ends(lm, ctx) if ctx.pp_size > 1 else set()
    load_rank_weights(lm, find_safetensors_files(Path(model_dir)), Path(model_dir),
                      ctx.tp_rank, ctx.tp_size,
                      rename=stage_name_map(hf_config.num_hidden_layers, first, count), skip=skip)
    process_weights_after_loading(lm)
    lm.eval()
    model = lm if ctx.pp_size == 1 else PipelineStage(lm, ctx, hf_config.vocab_size).eval()
    model.lora_plan = rank_lora_plan(hf_config, ctx, first)   # LoRA serving cuts adapters by it
    return model


def _drop_unused_ends(lm: CausalLM, ctx: ParallelContext) -> set[str]:
    """Free the embedding on stages that do not look tokens up (unless the head is tied to
    it there) and the head on stages before the last; returns the names not to load."""
    skip: set[str] = set()
    tied = lm.options.tie_word_embeddings
    needs_embedding = ctx.is_first_stage or (tied and ctx.is_last_stage)
    for name, module, needed in (("model.embed_tokens", lm.model.embed_tokens, needs_embedding),
                                 ("lm_head", lm.lm_head, ctx.is_last_stage or (
                                     tied and needs_embedding))):
        if needed:
            continue
        for pname, param in module.named_parameters(recurse=False):
            param.data = param.data.new_empty((0,) + tuple(param.shape[1:]))
            skip.add(f"{name}.{pname}")
    if tied and not needs_embedding:
        skip.add("model.embed_tokens.weight")
    return skip
