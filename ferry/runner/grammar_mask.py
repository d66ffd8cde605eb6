"""Structured output in the sampler: the engine's grammar bitmasks applied to the logits.

The engine builds the step's bitmask on the host (``GrammarBitmask``, numpy int32, one row
per constrained request); here the rows are stacked into one (C, W) host tensor, copied
to the device once and applied by ``kernels.apply_token_bitmask`` (a C++ pass over the
rows on the CPU; PyTorch, unpacking to (C, V) booleans, elsewhere). EOS is in a row's mask
only where the grammar may end, so a constrained request stops only when its output is
complete.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ferry import kernels
from ferry.kernels.reference import unpack_bitmask  # noqa: F401  (re-exported for tests)
from ferry.runner.input_batch import index_tensor
from ferry.runner.logits_processors import SamplingRow
from ferry.runner.pending_output import SampledRequest


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


class GrammarMaskProcessor:
    """Sets to ``-inf`` the logits of tokens a row's grammar forbids. Reads the bitmask
    the engine computed from the output tokens, so it needs them on the host."""

    reads_output_tokens = True

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        chosen = [i for i, row in enumerate(rows) if row.token_bitmask is not None]
        if not chosen:
            return logits
        host = torch.from_numpy(np.stack([rows[i].token_bitmask for i in chosen]))  # (C, W)
        bitmask = host.to(logits.device, non_blocking=True)
        if len(chosen) == len(rows):
            return kernels.apply_token_bitmask(logits, bitmask)
        return kernels.apply_token_bitmask(logits, bitmask, index_tensor(chosen, logits.device))
