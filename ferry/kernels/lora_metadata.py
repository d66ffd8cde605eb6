"""LoRAMapping: which adapter slot each token of a flattened batch uses.

Built by the runner once per step from the requests' adapters (``ferry.lora.slots``) and
passed to the LoRA layers through their shared ``LoRABatch`` holder; a step without any
LoRA request has no mapping at all, so the layers do no LoRA work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRAMapping:
    """Tokens ``segments[i] = (start, end, slot)`` use the adapter in device slot ``slot``.

    Requests are contiguous in the flat batch, so a request is one segment (neighbours on
    the same adapter are merged). Tokens in no segment use the base model only.
    """

    token_slots: torch.Tensor        # (T,) int32: slot of each token, -1 = base model
    segments: list[tuple[int, int, int]]   # host copy for loops (start, end, slot)
    segment_table: torch.Tensor      # (N, 3) int32 on the device: the same, for kernels
    max_rank: int                    # largest rank in the step: the kernels read this many
    max_segment_len: int             # longest segment (kernel grids)

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]


def segments_from_slots(token_slots: list[int]) -> list[tuple[int, int, int]]:
    """Runs of equal slots >= 0 in a per-token slot list, as (start, end, slot)."""
    segments: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(token_slots) + 1):
        if i == len(token_slots) or token_slots[i] != token_slots[start]:
            if token_slots[start] >= 0:
                segments.append((start, i, token_slots[start]))
            start = i
    return segments
