"""Integer codes packed into int32 words, as GPTQ and AWQ checkpoints store them.

Along one dim, ``32 // bits`` consecutive codes share one int32 word. Slot ``i`` of a word
(bits ``[bits*i, bits*(i+1))``) holds the code at position ``order[i]`` of its run of
``32 // bits``; GPTQ uses the natural order, AWQ's GEMM layout the interleaved
``AWQ_ORDER`` for 4 bits. Codes are unsigned (0 .. 2**bits - 1); the int32 words are the
same bits read as signed.
"""
from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # slot i of an AWQ int32 holds column order[i]


def pack_factor(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"int32 packing supports bits 2, 4 and 8, got {bits}")
    return 32 // bits


def pack_int32(codes: torch.Tensor, bits: int, dim: int,
               order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Codes (any 2-D shape) -> int32 words, ``32 // bits`` codes per word along ``dim``."""
    factor = pack_factor(bits)
    order = order or tuple(range(factor))
    codes = codes.to(torch.int64).movedim(dim, -1)                        # (..., L)
    if codes.shape[-1] % factor:
        raise ValueError(f"cannot pack {codes.shape[-1]} codes {factor} to a word")
    runs = codes.reshape(*codes.shape[:-1], -1, factor)                   # (..., L/f, f)
    slots = runs[..., list(order)]                                        # slot i <- code order[i]
    shifts = bits * torch.arange(factor, dtype=torch.int64, device=codes.device)
    words = (slots << shifts).sum(dim=-1)                                 # (..., L/f) < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words)             # the same bits as int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int,
                 order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 words -> codes (int32, 0 .. 2**bits - 1), ``32 // bits`` per word along ``dim``."""
    factor = pack_factor(bits)
    order = order or tuple(range(factor))
    moved = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF           # (..., W) unsigned
    shifts = bits * torch.arange(factor, dtype=torch.int64, device=words.device)
    slots = (moved.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)           # (..., W, f) slot i
    codes = torch.empty_like(slots)
    codes[..., list(order)] = slots                                       # code order[i] <- slot i
    return codes.reshape(*moved.shape[:-1], -1).to(torch.int32).movedim(-1, dim).contiguous()
