"""Structured output in the sampler: the engine's grammar bitmasks applied to the logits.

The engine builds the step's bitmask on the host (``GrammarBitmask``, numpy int32, one row
per constrained request); here the rows are stacked into one (C, W) host tensor, copied
to the device once, unpacked to (C, V) booleans and applied with one ``masked_fill``, for
every kernel backend alike (this is plain PyTorch on the logits). EOS is in a row's mask
only where the grammar may end, so a constrained request stops only when its output is
complete.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ferry.runner.input_batch import index_tensor
from ferry.runner.logits_processors import SamplingRow
from ferry.runner.pending_output import SampledRequest

_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def attach_bitmasks(rows: list[SamplingRow], sampled: list[SampledRequest],
                    grammar_bitmask: Any) -> None:
    """Give each constrained request's sampling rows their bitmask rows (``GrammarBitmask``
    or None): one per sampled position, drafts included."""
    if grammar_bitmask is None:
        return
    first: dict[str, int] = {}
    count: dict[str, int] = {}
    for index, request_id in enumerate(grammar_bitmask.request_ids):
        first.setdefault(request_id, index)
        count[request_id] = count.get(request_id, 0) + 1
    start = 0
    for request in sampled:
        at = first.get(request.request_id)
        if at is not None:
            if count[request.request_id] != request.num_rows:
                raise RuntimeError(f"request {request.request_id} samples {request.num_rows} "
                                   f"rows but has {count[request.request_id]} mask rows")
            for j in range(request.num_rows):
                rows[start + j].token_bitmask = grammar_bitmask.bitmask[at + j]
        start += request.num_rows


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(C, W) int32 -> (C, V) bool: bit ``t % 32`` of word ``t // 32`` is token ``t``."""
    device = bitmask.device
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = _BIT_SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # (C, W, 32)
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()  # (C, V)


class GrammarMaskProcessor:
    """Sets to ``-inf`` the logits of tokens a row's grammar forbids. Reads the bitmask
    the engine computed from the output tokens, so it needs them on the host."""

    reads_output_tokens = True

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        chosen = [i for i, row in enumerate(rows) if row.token_bitmask is not None]
        if not chosen:
            return logits
        vocab = logits.shape[1]
        host = torch.from_numpy(np.stack([rows[i].token_bitmask for i in chosen]))  # (C, W)
        allowed = unpack_bitmask(host.to(logits.device, non_blocking=True), vocab)  # (C, V)
        if len(chosen) == len(rows):
            return _masked(logits, allowed)
        index = index_tensor(chosen, logits.device)
        return logits.index_copy(0, index, _masked(logits[index], allowed))


def _masked(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(C, V) logits with forbidden tokens at -inf. Where an earlier processor already
    removed every allowed token (``min_tokens`` banning the EOS the grammar needs), the
    allowed tokens get equal logits instead: the grammar always wins, and no sync."""
    masked = logits.masked_fill(~allowed, float("-inf"))
    empty = torch.isneginf(masked).all(dim=-1, keepdim=True)  # (C, 1)
    return torch.where(empty & allowed, torch.zeros((), device=logits.device), masked)
