"""The runner's adapters: a host-memory LRU cache and the device slots (torch).

``add`` loads and checks an adapter into host memory (``max_cpu_loras`` of them; an
evicted one is read again from its path when needed). ``prepare`` turns a step's
per-request adapters into the step's :class:`LoRAMapping`, first swapping each adapter the
step needs into a device slot (``max_loras`` of them), evicting the least recently used
adapter the step does not need. The scheduler admits at most ``max_loras`` distinct
adapters among running requests, so a step always finds its slots.

On a tensor/pipeline-parallel rank the host copy holds this rank's slices of its own
layers only. Every rank sees the same adds, removes and steps in the same order (the
executor broadcasts them), so the LRU choices, and with them each adapter's slot, are
the same on every rank without any message about slots.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ferry.kernels.lora_metadata import LoRAMapping, segments_from_slots
from ferry.layers.lora import LoRAModel
from ferry.lora.weights import LoRAWeights, load_adapter

logger = logging.getLogger(__name__)


@dataclass
class SlotStats:
    swaps_in: int = 0         # adapters copied into a device slot
    swaps_out: int = 0        # resident adapters evicted to make room
    host_loads: int = 0       # adapters read from disk (first load or after host eviction)


class LoRASlots:
    def __init__(self, lora_model: LoRAModel, max_cpu_loras: int, device: torch.device):
        self.model = lora_model
        self.max_cpu_loras = max_cpu_loras
        self.device = device
        self.stats = SlotStats()
        self._paths: dict[int, str] = {}
        self._ranks: dict[int, int] = {}
        self._host: OrderedDict[int, LoRAWeights] = OrderedDict()    # LRU: oldest first
        self._slot_ids: list[int | None] = [None] * lora_model.num_slots
        self._resident: OrderedDict[int, int] = OrderedDict()        # lora id -> slot, LRU

    @property
    def batch(self):
        return self.model.batch

    def add(self, lora_id: int, path: str) -> LoRAWeights:
        """Load and check the adapter at ``path`` as ``lora_id`` (raises ``LoRAError``)."""
        weights = self._read(path)
        self.stats.host_loads += 1
        self._paths[lora_id] = path
        self._ranks[lora_id] = weights.rank
        self._cache(lora_id, weights)
        return weights

    def remove(self, lora_id: int) -> None:
        """Forget an adapter (its slot becomes free); unknown ids are ignored."""
        self._paths.pop(lora_id, None)
        self._ranks.pop(lora_id, None)
        self._host.pop(lora_id, None)
        slot = self._resident.pop(lora_id, None)
        if slot is not None:
            self._slot_ids[slot] = None

    def resident_ids(self) -> list[int]:
        return list(self._resident)

    def prepare(self, lora_ids: list[int | None], num_tokens: list[int]) -> LoRAMapping | None:
        """The step's mapping from each request's adapter and token count (None: no LoRA)."""
        needed = self.make_resident(lora_ids)
        if not needed:
            return None
        token_slots: list[int] = []
        for lora_id, count in zip(lora_ids, num_tokens):
            token_slots.extend([-1 if lora_id is None else self._resident[lora_id]] * count)
        segments = segments_from_slots(token_slots)
        max_rank = max(self._ranks[i] for i in needed)
        return LoRAMapping(
            token_slots=torch.tensor(token_slots, dtype=torch.int32).to(self.device),
            segments=segments,
            segment_table=torch.tensor(segments, dtype=torch.int32).reshape(-1, 3).to(self.device),
            max_rank=max_rank, max_segment_len=max(e - s for s, e, _ in segments))

    def make_resident(self, lora_ids: list[int | None]) -> set[int]:
        """Swap the adapters in ``lora_ids`` into device slots (at most ``max_loras``);
        returns them as a set."""
        needed = {i for i in lora_ids if i is not None}
        for lora_id in sorted(needed):   # sorted: the same slot choices on every rank
            self._make_resident(lora_id, needed)
        return needed

    # ------------------------------------------------------------------ internals
    def _make_resident(self, lora_id: int, needed: set[int]) -> None:
        if lora_id in self._resident:
            self._resident.move_to_end(lora_id)
            return
        slot = self._free_slot(needed)
        weights = self._host_weights(lora_id)
        for layer in self.model.layers:
            layer.clear_slot(slot)
        for module, (a, b) in weights.modules.items():
            place = self.model.places[module]
            place.layer.set_sub(slot, place.sub, a, b, weights.scaling)
        self._slot_ids[slot] = lora_id
        self._resident[lora_id] = slot
        self.stats.swaps_in += 1

    def _free_slot(self, needed: set[int]) -> int:
        if None in self._slot_ids:
            return self._slot_ids.index(None)
        for victim in self._resident:           # least recently used first
            if victim not in needed:
                slot = self._resident.pop(victim)
                self.stats.swaps_out += 1
                return slot
        raise RuntimeError(f"a step needs more than {len(self._slot_ids)} LoRA adapters at "
                           "once; the scheduler admits at most max_loras")

    def _host_weights(self, lora_id: int) -> LoRAWeights:
        weights = self._host.get(lora_id)
        if weights is not None:
            self._host.move_to_end(lora_id)
            return weights
        if lora_id not in self._paths:
            raise KeyError(f"LoRA adapter id {lora_id} was never added to the runner")
        weights = self._read(self._paths[lora_id])
        self.stats.host_loads += 1
        self._cache(lora_id, weights)
        return weights

    def _read(self, path: str) -> LoRAWeights:
        """The adapter at ``path``, checked against the whole model, cut to this rank."""
        weights = load_adapter(path, self.model.targets, self.model.max_rank)
        weights.modules = self.model.local_modules(weights.modules)
        return weights

    def _cache(self, lora_id: int, weights: LoRAWeights) -> None:
        self._host[lora_id] = weights
        self._host.move_to_end(lora_id)
        while len(self._host) > self.max_cpu_loras:
            evicted, _ = self._host.popitem(last=False)
            logger.info("LoRA adapter %d left host memory (max_cpu_loras=%d); it is read "
                        "again from disk when next needed", evicted, self.max_cpu_loras)


def build_lora_slots(model: torch.nn.Module, max_loras: int, max_cpu_loras: int,
                     max_lora_rank: int, dtype: torch.dtype, device: torch.device) -> LoRASlots:
    """Attach LoRA slot stacks to ``model`` (allocated now, before the KV cache is sized).

    A rank's part of a parallel model carries its ``lora_plan`` (``LoRAShardPlan``)."""
    from ferry.layers.lora import attach_lora

    lora_model = attach_lora(model, max_loras, max_lora_rank, dtype, device,
                             plan=getattr(model, "lora_plan", None))
    logger.info("LoRA: %d device slots of rank %d (%.1f MiB), %d adapters in host memory",
                max_loras, max_lora_rank, lora_model.nbytes() / 2**20, max_cpu_loras)
    return LoRASlots(lora_model, max_cpu_loras, device)
