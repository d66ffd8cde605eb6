"""Turn a SchedulerOutput into the flat tensors one forward pass reads."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ferry.kernels.attn_metadata import AttentionMetadata
from ferry.outputs import ScheduledRequest
from ferry.runner.request_states import RequestState


@dataclass
class ScheduledState:
    """A scheduled request with the runner's state of it (already updated for the step)."""

    scheduled: ScheduledRequest
    state: RequestState

    @property
    def num_sample_rows(self) -> int:
        """Logits rows the step samples: the last known token and each draft."""
        return 1 + len(self.scheduled.spec_token_ids) if self.scheduled.sample else 0


@dataclass
class ModelInput:
    requests: list[ScheduledState]     # decodes first, then prefill chunks and drafts
    input_ids: torch.Tensor            # (T,) int64
    positions: torch.Tensor            # (T,) int64
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor       # (R,) int64: the positions that sample, in request order
    sampling_requests: list[ScheduledState]
    # Async scheduling: flat positions in input_ids of placeholder tokens, and whose they are
    # (the k-th of a request's p placeholders is the k-th of its last p sampled tokens).
    placeholder_positions: list[int]
    placeholder_request_ids: list[str]
    placeholder_offsets: list[int]     # k - p: index from the end of the request's samples


def order_decodes_first(requests: list[ScheduledState]) -> list[ScheduledState]:
    """Decodes (one token) first: attention backends batch them in one call."""
    decodes = [r for r in requests if r.scheduled.num_tokens == 1]
    others = [r for r in requests if r.scheduled.num_tokens != 1]
    return decodes + others


def build_model_input(requests: list[ScheduledState], block_size: int,
                      device: torch.device) -> ModelInput:
    requests = order_decodes_first(requests)
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start = [0]
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    placeholders: tuple[list[int], list[str], list[int]] = ([], [], [])
    for item in requests:
        req, block_ids = item.scheduled, item.state.block_ids
        start, n = req.start_pos, req.num_tokens
        _note_placeholders(req, query_start[-1], placeholders)
        input_ids.extend(req.token_ids)
        input_ids.extend(req.spec_token_ids)
        positions.extend(range(start, start + n))
        slots.extend(_slots(block_ids, block_size, start, n))
        query_start.append(query_start[-1] + n)
        seq_lens.append(start + n)
        end = query_start[-1]
        logits_indices.extend(range(end - item.num_sample_rows, end))

    max_blocks = max(len(r.state.block_ids) for r in requests)
    tables = [r.state.block_ids + [0] * (max_blocks - len(r.state.block_ids)) for r in requests]
    meta = AttentionMetadata(
        slot_mapping=device_tensor(slots, torch.int64, device),
        query_start_loc=device_tensor(query_start, torch.int32, device),
        seq_lens=device_tensor(seq_lens, torch.int32, device),
        block_tables=device_tensor(tables, torch.int32, device),
        query_lens_cpu=[r.scheduled.num_tokens for r in requests],
        seq_lens_cpu=seq_lens,
        num_decodes=sum(1 for r in requests if r.scheduled.num_tokens == 1),
        block_size=block_size,
    )
    return ModelInput(
        requests=requests,
        input_ids=device_tensor(input_ids, torch.int64, device),
        positions=device_tensor(positions, torch.int64, device),
        attn_metadata=meta,
        logits_indices=device_tensor(logits_indices, torch.int64, device),
        sampling_requests=[r for r in requests if r.scheduled.sample],
        placeholder_positions=placeholders[0],
        placeholder_request_ids=placeholders[1],
        placeholder_offsets=placeholders[2],
    )


def _note_placeholders(req: ScheduledRequest, query_start: int,
                       placeholders: tuple[list[int], list[str], list[int]]) -> None:
    """Record where the request's placeholder tokens sit (the end of its known tokens)."""
    count = req.num_placeholders
    first = query_start + len(req.token_ids) - count
    for k in range(count):
        placeholders[0].append(first + k)
        placeholders[1].append(req.request_id)
        placeholders[2].append(k - count)


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


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return device_tensor(values, torch.int64, device)


def float_tensor(values: list[float], device: torch.device) -> torch.Tensor:
    return device_tensor(values, torch.float32, device)
