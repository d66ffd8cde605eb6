"""Attention debug trace, the PyTorch reference op: for chosen rows of a step's batch, the
softmax entropy of each head's attention distribution and its top-k attended positions.

Computed from the same query and the same paged keys the attention reads (the keys of a
row's sequence through its block table, after ``write_kv_cache``), with the same causal
and sliding-window visibility and the same scale, in float32; only for the rows asked for,
so a step with no traced row costs nothing. A device-agnostic PyTorch op: it runs beside
any attention backend (reference, C++, Triton) on that backend's q and KV cache.

The runner asks for it through ``AttentionMetadata.trace_rows`` (runner/attention_tracing.py)
and ``kernels.attention_trace`` dispatches it: on the cpu backend to the C++ kernel
(``cpu/csrc/attention_trace.cpp``), on GPUs to the Triton kernel
(``triton/attention_trace.py``), both tested against this op; on the reference backend
to this op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ferry.kernels.attn_metadata import AttentionMetadata


@dataclass
class TraceRows:
    """Which rows of the flattened batch to trace: row ``rows[i]`` is a query of sequence
    ``seqs[i]`` at position ``positions[i]`` (plain host lists)."""

    rows: list[int]
    seqs: list[int]
    positions: list[int]
    top_k: int = 8


@dataclass
class AttentionTrace:
    """Per traced row and head: ``entropy`` (R, H) in nats; ``top_positions`` (R, H, k)
    int64 and ``top_weights`` (R, H, k) float32, by weight descending, of equal weights
    the lower position first; a row that sees fewer than k keys is padded with position
    -1 and weight 0."""

    entropy: torch.Tensor
    top_positions: torch.Tensor
    top_weights: torch.Tensor


def rows_of_sequences(meta: AttentionMetadata, seqs: list[int],
                      include_prompt: bool = False, top_k: int = 8) -> TraceRows:
    """The rows of sequences ``seqs`` (batch indices): every query row with
    ``include_prompt``, else only the last row of each sequence (the one whose output
    samples the next token)."""
    rows, trace_seqs, positions = [], [], []
    starts = [0]
    for query_len in meta.query_lens_cpu:
        starts.append(starts[-1] + query_len)
    for seq in seqs:
        query_len, seq_len = meta.query_lens_cpu[seq], meta.seq_lens_cpu[seq]
        first = 0 if include_prompt else query_len - 1
        for i in range(first, query_len):
            rows.append(starts[seq] + i)
            trace_seqs.append(seq)
            positions.append(seq_len - query_len + i)
    return TraceRows(rows, trace_seqs, positions, top_k)


def attention_trace(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, trace: TraceRows, top_k: int = 8,
                    sliding_window: int | None = None) -> AttentionTrace:
    """Entropy and top-k of the attention of ``trace``'s rows.

    query: (T, H, D); kv_cache: (2, num_blocks, block_size, Hkv, D) holding this step's
    keys already. Returns tensors on the query's device.
    """
    num_heads = query.shape[1]
    group = num_heads // kv_cache.shape[3]
    num_rows = len(trace.rows)
    entropy = torch.zeros(num_rows, num_heads, dtype=torch.float32, device=query.device)
    top_positions = torch.full((num_rows, num_heads, top_k), -1, dtype=torch.int64,
                               device=query.device)
    top_weights = torch.zeros(num_rows, num_heads, top_k, dtype=torch.float32,
                              device=query.device)
    for i, (row, seq, position) in enumerate(zip(trace.rows, trace.seqs, trace.positions)):
        keys, key_positions = _keys_of(kv_cache, meta, seq, position, sliding_window)
        keys = keys.float().repeat_interleave(group, dim=1)                  # (L, H, D)
        scores = torch.einsum("hd,lhd->hl", query[row].float(), keys) * scale  # (H, L)
        probs = torch.softmax(scores, dim=-1)                                # (H, L)
        entropy[i] = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        k = min(top_k, probs.shape[1])
        # A stable sort, not topk (whose order of ties is unspecified): of equal weights
        # the lower position comes first, as in the C++ kernel.
        weights, index = probs.sort(dim=-1, descending=True, stable=True)    # (H, L)
        top_weights[i, :, :k] = weights[:, :k]
        top_positions[i, :, :k] = key_positions[index[:, :k]]
    return AttentionTrace(entropy, top_positions, top_weights)


def _keys_of(kv_cache: torch.Tensor, meta: AttentionMetadata, seq: int, position: int,
             sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys a query at ``position`` of sequence ``seq`` sees, and their positions:
    (L, Hkv, D), (L,)."""
    block_size = meta.block_size
    first = 0 if sliding_window is None else max(0, position - sliding_window + 1)
    num_blocks = math.ceil((position + 1) / block_size)
    block_ids = meta.block_tables[seq, :num_blocks].long()
    keys = kv_cache[0].index_select(0, block_ids).flatten(0, 1)              # (nb*bs, Hkv, D)
    return (keys[first:position + 1],
            torch.arange(first, position + 1, device=kv_cache.device))
