"""Device graphs (CUDA graphs; HIP graphs on ROCm, same API) for decode steps.

A decode step of a small batch launches about ten kernels per layer, and the GPU finishes
each one sooner than Python can launch the next: the step is launch-bound. A graph
records the whole forward once and replays it with one launch. Graphs fix shapes and
kernel arguments, so:

- a batch of B decodes runs the graph of the smallest bucket >= B (1, 2, 4, 8, then
  multiples of 8 up to ``max_num_seqs``); padding rows write their K/V to no slot
  (slot -1) and attend over one position of block 0, and their output is dropped;
- the inputs live in static buffers that the graph reads; a step copies its values in;
- the attention is planned at capture for the longest context (``max_model_len``); the
  decode kernel's split-K deals key tiles round-robin over the splits, so that plan fits
  any sequence and still spreads a short one over the splits (the ones past it are empty).

Only decode-only steps with at most ``max_num_seqs`` sequences replay a graph; prefills
and mixed steps run eagerly. The capture backend is a small interface so that the
bucket, padding and buffer logic is tested on the CPU with a stand-in that records the
forward and calls it again (``EagerReplay``); on a GPU ``platform.DeviceGraphCapture`` captures.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Protocol

import torch

from ferry.kernels.attn_metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, 16, 24, ... and max_num_seqs itself."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    sizes += range(8, max_num_seqs, 8)
    return sorted(set(sizes) | {max_num_seqs})


class GraphCapture(Protocol):
    def capture(self, forward: Callable[[], None]) -> Callable[[], None]:
        """Record ``forward`` (which reads and writes only static tensors); return replay."""


class EagerReplay:
    """Stand-in capture for tests without a GPU: "replay" runs the recorded forward again,
    on the same static buffers, which is what a graph replay does."""

    def capture(self, forward: Callable[[], None]) -> Callable[[], None]:
        forward()
        return forward


class DecodeGraphs:
    """Per-bucket captured forwards of the model for decode-only steps.

    ``try_run(input_ids, positions, meta)`` returns the hidden states (B, hidden) when a
    graph covers the step, else None (the caller runs the model eagerly).
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], *,
                 max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device, capture: GraphCapture) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = decode_buckets(max_num_seqs)
        self.max_model_len = max_model_len
        self.block_size = block_size
        largest = self.buckets[-1]
        width = math.ceil(max_model_len / block_size)
        # Static inputs, sized for the largest bucket; bucket b uses the first b rows.
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(largest, width, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self._hidden: dict[int, torch.Tensor] = {}
        self._replays: dict[int, Callable[[], None]] = {}
        self._capture = capture

    @torch.inference_mode()
    def capture_all(self) -> None:
        # Largest first: the smaller graphs then fit in the memory pool it leaves.
        for size in reversed(self.buckets):
            self._replays[size] = self._capture.capture(self._forward_for(size))
        logger.info("captured decode graphs for batch sizes %s", self.buckets)

    def _forward_for(self, size: int) -> Callable[[], None]:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], query_start_loc=self.query_start_loc[:size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size],
            query_lens_cpu=[1] * size,
            seq_lens_cpu=[self.max_model_len] * size,   # plan the kernels for any length
            num_decodes=size, block_size=self.block_size)

        def forward() -> None:
            self._hidden[size] = self.model(self.input_ids[:size], self.positions[:size],
                                            self.kv_caches, meta)
        return forward

    def bucket_for(self, meta: AttentionMetadata) -> int | None:
        """The bucket that runs this step, or None when it is not a graph step."""
        num = meta.num_seqs
        if num == 0 or meta.num_decodes != num or num > self.buckets[-1]:
            return None
        if meta.block_tables.shape[1] > self.block_tables.shape[1]:
            return None
        return next(size for size in self.buckets if size >= num)

    def try_run(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor | None:
        size = self.bucket_for(meta)
        if size is None or size not in self._replays:
            return None
        num, width = meta.num_seqs, meta.block_tables.shape[1]
        self.input_ids[:num].copy_(input_ids[:num])
        self.positions[:num].copy_(positions[:num])
        self.slot_mapping[:num].copy_(meta.slot_mapping[:num])
        self.seq_lens[:num].copy_(meta.seq_lens)
        # Columns past `width` keep older values; a row never reads past its own blocks.
        self.block_tables[:num, :width].copy_(meta.block_tables)
        if size > num:   # padding rows: no KV write, one visible position
            self.slot_mapping[num:size].fill_(-1)
            self.seq_lens[num:size].fill_(1)
            self.block_tables[num:size, 0].zero_()
        self._replays[size]()
        return self._hidden[size][:num]
