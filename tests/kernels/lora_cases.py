"""Shared cases for the segmented LoRA kernel tests: a mixed batch and its naive result."""
from __future__ import annotations

import torch

from ferry.kernels.lora_metadata import LoRAMapping, segments_from_slots

# Per-request (tokens, slot): base-model requests (-1) between adapters, a slot used twice,
# a long prefill that spans several token blocks.
REQUESTS = [(1, 0), (1, -1), (1, 2), (5, 2), (1, 1), (37, 0), (3, -1), (20, 3)]


def make_mapping(requests=REQUESTS, device="cpu", max_rank=8) -> LoRAMapping:
    token_slots = [slot for n, slot in requests for _ in range(n)]
    segments = segments_from_slots(token_slots)
    table = torch.tensor(segments or [(0, 0, 0)], dtype=torch.int32, device=device)[:len(segments)]
    return LoRAMapping(torch.tensor(token_slots, dtype=torch.int32, device=device), segments,
                       table, max_rank, max((e - s for s, e, _ in segments), default=0))


def naive_delta(x, a, b, mapping):
    """Per token, in float64: B^T[slot]^T @ (A[slot] @ x[t]) (zero for base tokens)."""
    out = torch.zeros(x.shape[0], b.shape[2], dtype=torch.float64)
    for t, slot in enumerate(mapping.token_slots.tolist()):
        if slot >= 0:
            out[t] = (a[slot].double() @ x[t].double()) @ b[slot].double()
    return out
