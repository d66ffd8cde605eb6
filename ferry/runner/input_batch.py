"""Turn a SchedulerOutput into the flat tensors one forward pass reads."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ferry.outputs import ScheduledRequest, SchedulerOutput
from ferry.kernels.attn_metadata import AttentionMetadata


@dataclass
class ModelInput:
    requests: list[ScheduledRequest]   # decodes first, then prefill chunks
    input_ids: torch.Tensor            # (T,) int64
    positions: torch.Tensor            # (T,) int64
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor       # (N,) int64: last token of each request that samples
    sampling_requests: list[ScheduledRequest]
    # Async scheduling: flat positions in input_ids of placeholder tokens, and whose they are.
    placeholder_positions: list[int]
    placeholder_request_ids: list[str]


def order_decodes_first(scheduled: list[ScheduledRequest]) -> list[ScheduledRequest]:
    """Decodes (one token) first: attention backends batch them in one call."""
    decodes = [s for s in scheduled if s.num_tokens == 1]
    prefills = [s for s in scheduled if s.num_tokens != 1]
    return decodes + prefills


def build_model_input(sched: SchedulerOutput, block_size: int, device: torch.device) -> ModelInput:
    requests = order_decodes_first(sched.scheduled)
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start = [0]
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    placeholder_positions: list[int] = []
    placeholder_request_ids: list[str] = []
    for req in requests:
        start, n = req.start_pos, req.num_tokens
        if req.num_placeholders:
            if req.num_placeholders > 1:
                raise ValueError(f"request {req.request_id!r} has {req.num_placeholders} "
                                 "placeholder tokens; a step fills in at most one")
            placeholder_positions.append(query_start[-1] + n - 1)
            placeholder_request_ids.append(req.request_id)
        input_ids.extend(req.token_ids)
        positions.extend(range(start, start + n))
        slots.extend(_slots(req.block_ids, block_size, start, n))
        query_start.append(query_start[-1] + n)
        seq_lens.append(start + n)
        if req.sample:
            logits_indices.append(query_start[-1] - 1)

    max_blocks = max(len(r.block_ids) for r in requests)
    tables = [r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r in requests]
    meta = AttentionMetadata(
        slot_mapping=device_tensor(slots, torch.int64, device),
        query_start_loc=device_tensor(query_start, torch.int32, device),
        seq_lens=device_tensor(seq_lens, torch.int32, device),
        block_tables=device_tensor(tables, torch.int32, device),
        query_lens_cpu=[r.num_tokens for r in requests],
        seq_lens_cpu=seq_lens,
        num_decodes=sum(1 for r in requests if r.num_tokens == 1),
        block_size=block_size,
    )
    return ModelInput(
        requests=requests,
        input_ids=device_tensor(input_ids, torch.int64, device),
        positions=device_tensor(positions, torch.int64, device),
        attn_metadata=meta,
        logits_indices=device_tensor(logits_indices, torch.int64, device),
        sampling_requests=[r for r in requests if r.sample],
        placeholder_positions=placeholder_positions,
        placeholder_request_ids=placeholder_request_ids,
    )


def _slots(block_ids: list[int], block_size: int, start: int, n: int) -> list[int]:
    """Cache slot (block_id * block_size + offset) of positions start .. start + n - 1."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, start + n)]


def device_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of host values on ``device`` without waiting for the device's queued work.

    Built on the host, then copied once: no per-element device writes. ``torch.tensor(...,
    device=gpu)`` would copy from pageable memory and synchronize the stream, which stalls
    the host until the step in flight ends (no overlap); a pinned copy is asynchronous.
    """
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
