"""AttentionMetadata: how a flattened batch maps onto the paged KV cache.

Passed as an argument through the model (never global state). Every attention backend
(the PyTorch reference in ``ferry/kernels/reference.py`` and the Triton kernels) reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """A batch of B sequences flattened into T = sum(query_lens) tokens.

    The runner orders sequences with the decodes (query_len == 1) first: the first
    ``num_decodes`` sequences each contribute one token, the rest are prefill chunks
    (which may sit on top of cached prefix blocks: seq_len > query_len).

    KV cache per layer: tensor of shape (2, num_blocks, block_size, num_kv_heads, head_dim),
    index 0 = keys, 1 = values. A token at logical position p of sequence i lives in block
    ``block_tables[i, p // block_size]`` at offset ``p % block_size``.
    """

    slot_mapping: torch.Tensor      # (T,) int64: block_id * block_size + offset for each new token
    query_start_loc: torch.Tensor   # (B + 1,) int32: cumulative query lengths, starts at 0
    seq_lens: torch.Tensor          # (B,) int32: tokens in the KV after this step (cached + new)
    block_tables: torch.Tensor      # (B, max_blocks_per_seq) int32, padded with 0
    query_lens_cpu: list[int]       # host copies for loops and kernel grids
    seq_lens_cpu: list[int]
    num_decodes: int
    block_size: int
    # Attention debug trace: the rows to trace (a ``TraceRows``) and the list each layer
    # appends its ``AttentionTrace`` to; None in every step without a traced request.
    trace_rows: Any = None
    trace_out: list | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)
