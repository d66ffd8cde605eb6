"""LoRA on the decoder's projections: per-layer slot stacks and the batched delta.

``attach_lora(model, ...)`` gives every adaptable linear (qkv_proj, o_proj, gate_up_proj,
down_proj) a :class:`LoRALayer`; the linear then returns ``method.apply(x) + delta``, so
LoRA works on top of any ``LinearMethod`` (quantized bases included). The delta is the
segmented shrink/expand of ``ferry.kernels`` over the adapters held in preallocated device
slots, one sub-projection at a time (q, k and v of the packed QKV each have their own A
and B). All layers of a model share one :class:`LoRABatch`: the runner sets its mapping
for a step with LoRA requests and clears it after; without a mapping a layer does nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
        """y (T, out) += this step's LoRA delta of x (T, in), in place; y when no LoRA runs."""
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


@dataclass
class LoRAModel:
    """What ``attach_lora`` made: the shared batch and, per HF module path, its place."""

    batch: LoRABatch
    num_slots: int
    max_rank: int
    # HF module path (model.layers.3.self_attn.q_proj) -> (layer, sub index)
    places: dict[str, tuple[LoRALayer, int]] = field(default_factory=dict)
    # HF module path -> (in_features, out_features): what an adapter's shapes must be
    targets: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def layers(self) -> list[LoRALayer]:
        return list({id(layer): layer for layer, _ in self.places.values()}.values())

    def nbytes(self) -> int:
        return sum(l.lora_a.nbytes + l.lora_b.nbytes for l in self.layers)


def attach_lora(model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                device: torch.device) -> LoRAModel:
    """Give each adaptable projection of ``model`` its slot stacks (allocated now, once)."""
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
            lora.places[hf_name] = (layer, index)
            lora.targets[hf_name] = (module.input_size, subs[index][1])
    return lora
