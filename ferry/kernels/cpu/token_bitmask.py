"""Structured output's token mask on float32 CPU logits through the C++ kernel
(``csrc/token_bitmask.cpp``); other dtypes and layouts take the reference."""
from __future__ import annotations

import torch

from ferry.kernels import reference
from ferry.kernels.cpu._lib import check, functions


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
    if (functions() is None or logits.dtype != torch.float32 or logits.dim() != 2
            or not logits.is_cpu or not bitmask.is_cpu or bitmask.dtype != torch.int32
            or bitmask.dim() != 2 or bitmask.shape[1] * 32 < logits.shape[1]):
        return reference.apply_token_bitmask(logits, bitmask, rows)
    logits = logits.contiguous()
    if rows is None:   # every row masked: one pass from the logits into a new tensor
        out, index = torch.empty_like(logits), torch.arange(logits.shape[0])
    else:              # the other rows as they are: copy, then mask in place
        out, index = logits.clone(), rows.to(torch.int64).contiguous()
    if index.numel() != bitmask.shape[0]:
        raise ValueError(f"apply_token_bitmask: {bitmask.shape[0]} mask rows for "
                         f"{index.numel()} logits rows")
    bitmask = bitmask.contiguous()
    source = out if rows is not None else logits
    check(functions().apply_token_bitmask(
        source.data_ptr(), out.data_ptr(), out.shape[1], out.shape[1], bitmask.data_ptr(),
        bitmask.shape[1], index.data_ptr(), index.numel(), torch.get_num_threads()),
        "apply_token_bitmask")
    return out
