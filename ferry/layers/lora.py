"""LoRA on the decoder's projections: per-layer slot stacks and the batched delta.

``attach_lora(model, ...)`` gives every adaptable linear (qkv_proj, o_proj, gate_up_proj,
down_proj) a :class:`LoRALayer`; the linear then returns ``method.apply(x) + delta``, so
LoRA works on top of any ``LinearMethod`` (quantized bases included). The delta is the
segmented shrink/expand of ``ferry.kernels`` over the adapters held in preallocated device
slots, one sub-projection at a time (q, k and v of the packed QKV each have their own A
and B). All layers of a model share one :class:`LoRABatch`: the runner sets its mapping
for a step with LoRA requests and clears it after; without a mapping a layer does nothing.

On a rank of a tensor/pipeline-parallel model (``LoRAShardPlan``) the adapters are
sharded like their base layer: a column-parallel layer's B is sliced on its outputs (A
whole), a row-parallel layer's A on its inputs (B whole), and the row-parallel method
adds the partial delta before its one all-reduce, which then sums the deltas too
(``sum_r (x_r A_r^T) B^T = x A^T B^T``). Names and shapes are checked against the whole
model, so every rank accepts or refuses an adapter for the same reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ferry import kernels
from ferry.kernels.lora_metadata import LoRAMapping
from ferry.layers.linear import LinearBase

# ferry module leaf -> the HF projections packed into it, in packing order (shard ids).
_PACKED = {"qkv_proj": (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")),
           "gate_up_proj": (("gate_proj", 0), ("up_proj", 1))}
_PLAIN = ("o_proj", "down_proj")


@dataclass
class LoRABatch:
    """The current step's token -> slot mapping, shared by every LoRA layer of a model."""

    mapping: LoRAMapping | None = None


class LoRALayer:
    """Slot stacks of one linear: A (S, n_sub, r, in) and B^T (S, r, out), zero-padded.

    Sub-projection i covers output columns ``subs[i] = (offset, size)``; an adapter of
    rank k < r fills the first k rank entries, and the scale is folded into B.
    """

    def __init__(self, layer: LinearBase, subs: list[tuple[int, int]], batch: LoRABatch,
                 num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.subs = subs
        self.batch = batch
        self.lora_a = torch.zeros((num_slots, len(subs), max_rank, layer.input_size),
                                  dtype=dtype, device=device)
        self.lora_b = torch.zeros((num_slots, max_rank, layer.output_size), dtype=dtype,
                                  device=device)

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (T, out) += this step's LoRA delta of x (T, in), in place; y when no LoRA runs.

        On a row-parallel rank x and A hold this rank's inputs only and y is the partial
        sum before the all-reduce."""
        mapping = self.batch.mapping
        if mapping is None:
            return y
        rank = mapping.max_rank
        for i, (offset, size) in enumerate(self.subs):
            v = kernels.lora_shrink(x, self.lora_a[:, i, :rank], mapping)        # (T, rank) fp32
            kernels.lora_expand(v, self.lora_b[:, :rank, offset:offset + size],
                                y[:, offset:offset + size], mapping)
        return y

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def set_sub(self, slot: int, sub: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Slot ``slot``, sub-projection ``sub``: A (k, in), B (size, k), scaled."""
        offset, size = self.subs[sub]
        rank = a.shape[0]
        self.lora_a[slot, sub, :rank].copy_(a)
        self.lora_b[slot, :rank, offset:offset + size].copy_(b.t().float() * scale)


@dataclass(frozen=True)
class LoRAShardPlan:
    """How one rank's model relates to the whole model (made by the model builder).

    ``global_name`` maps a module path of this rank's model to the checkpoint's (a
    pipeline stage counts its layers from 0); ``targets`` are every adaptable module of
    the whole model with its full (in_features, out_features).
    """

    global_name: Callable[[str], str]
    targets: dict[str, tuple[int, int]]
    tp_rank: int = 0
    tp_size: int = 1


@dataclass(frozen=True)
class LoRAPlace:
    """Where one HF module's adapter lands: a sub-projection of a layer, and this rank's
    part of A's inputs and B's outputs ((start, stop), or None for all of it)."""

    layer: LoRALayer
    sub: int
    a_inputs: tuple[int, int] | None = None
    b_outputs: tuple[int, int] | None = None

    def local(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's A (k, in_local) and B (out_local, k) of a whole A (k, in), B (out, k)."""
        if self.a_inputs is not None:
            a = a[:, self.a_inputs[0]:self.a_inputs[1]].contiguous()
        if self.b_outputs is not None:
            b = b[self.b_outputs[0]:self.b_outputs[1]].contiguous()
        return a, b


@dataclass
class LoRAModel:
    """What ``attach_lora`` made: the shared batch and, per HF module path, its place."""

    batch: LoRABatch
    num_slots: int
    max_rank: int
    # HF module path (model.layers.3.self_attn.q_proj) -> its place on this rank
    places: dict[str, LoRAPlace] = field(default_factory=dict)
    # HF module path -> (in_features, out_features): what an adapter's shapes must be
    # (the whole model's, also the modules another pipeline stage holds)
    targets: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def layers(self) -> list[LoRALayer]:
        return list({id(p.layer): p.layer for p in self.places.values()}.values())

    def nbytes(self) -> int:
        return sum(l.lora_a.nbytes + l.lora_b.nbytes for l in self.layers)

    def local_modules(self, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """An adapter's (A, B) per module cut to this rank: its modules, its slices."""
        return {name: self.places[name].local(a, b) for name, (a, b) in modules.items()
                if name in self.places}


def attach_lora(model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                device: torch.device, plan: LoRAShardPlan | None = None) -> LoRAModel:
    """Give each adaptable projection of ``model`` its slot stacks (allocated now, once).

    ``plan``: this model is one rank's part of a bigger one (tensor/pipeline parallel).
    """
    lora = LoRAModel(LoRABatch(), num_slots, max_rank)
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(module, LinearBase) or leaf not in (*_PACKED, *_PLAIN):
            continue
        parent = name[: -len(leaf)]
        if leaf in _PACKED:
            hf_names = [(parent + hf, shard) for hf, shard in _PACKED[leaf]]
            subs = [module.shard_offsets[shard] for _, shard in hf_names]
        else:
            hf_names, subs = [(name, None)], [(0, module.output_size)]
        layer = LoRALayer(module, subs, lora.batch, num_slots, max_rank, dtype, device)
        module.lora = layer
        for index, (hf_name, _) in enumerate(hf_names):
            local_shape = (module.input_size, subs[index][1])
            if plan is None:
                lora.places[hf_name] = LoRAPlace(layer, index)
                lora.targets[hf_name] = local_shape
                continue
            hf_name = plan.global_name(hf_name)
            full = plan.targets[hf_name]
            lora.places[hf_name] = LoRAPlace(
                layer, index, _rank_part(full[0], local_shape[0], plan, hf_name),
                _rank_part(full[1], local_shape[1], plan, hf_name))
    if plan is not None:
        lora.targets = dict(plan.targets)
    return lora


def _rank_part(full: int, local: int, plan: LoRAShardPlan, name: str) -> tuple[int, int] | None:
    """(start, stop) of this rank's ``local`` of ``full`` features (None: all of them).

    Like the base weights' loader: ranks split ``full`` evenly, and when there are fewer
    parts than ranks (replicated KV heads) neighbouring ranks share a part.
    """
    if local == full:
        return None
    parts = full // local if local else 0
    if not parts or full % local or plan.tp_size % parts:
        raise ValueError(f"{name}: {full} features do not split into tensor-parallel parts "
                         f"of {local} over {plan.tp_size} ranks")
    part = plan.tp_rank * parts // plan.tp_size
    return part * local, (part + 1) * local
