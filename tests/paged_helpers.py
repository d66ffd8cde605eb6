"""Hand-built paged-KV batches for tests: block allocation, slot mappings, AttentionMetadata.

Blocks are handed out in a shuffled order so sequences get non-contiguous block ids, which
is what a real block pool produces after some churn.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ferry.kernels.attn_metadata import AttentionMetadata


@dataclass
class BlockAllocator:
    """Gives each sequence (by key) enough blocks for its tokens, from a shuffled free list."""

    num_blocks: int
    block_size: int
    seed: int = 0
    tables: dict = field(default_factory=dict)

    def __post_init__(self):
        self._free = list(range(self.num_blocks))
        random.Random(self.seed).shuffle(self._free)

    def grow(self, key, num_tokens: int) -> list[int]:
        blocks = self.tables.setdefault(key, [])
        while len(blocks) * self.block_size < num_tokens:
            if not self._free:
                raise RuntimeError("test allocator ran out of blocks")
            blocks.append(self._free.pop())
        return blocks


def make_metadata(block_lists: list[list[int]], computed_lens: list[int], query_lens: list[int],
                  block_size: int, num_decodes: int | None = None,
                  device: torch.device | str = "cpu") -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata for sequences that have ``computed_lens`` tokens cached and ``query_lens`` new.

    Returns (metadata, positions (T,) int64). ``num_decodes`` defaults to the number of
    leading sequences with one new token.
    """
    seq_lens = [c + q for c, q in zip(computed_lens, query_lens)]
    if num_decodes is None:
        num_decodes = next((i for i, q in enumerate(query_lens) if q != 1), len(query_lens))
    positions, slots = [], []
    for blocks, computed, seq_len in zip(block_lists, computed_lens, seq_lens):
        for pos in range(computed, seq_len):
            positions.append(pos)
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
    width = max(len(b) for b in block_lists)
    table = torch.zeros(len(block_lists), width, dtype=torch.int32)
    for i, blocks in enumerate(block_lists):
        table[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=table.to(device),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=seq_lens,
        num_decodes=num_decodes,
        block_size=block_size,
    )
    return meta, torch.tensor(positions, dtype=torch.int64, device=device)


def make_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                   head_dim: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """Per-layer caches (2, num_blocks, block_size, Hkv, D) filled with large random junk,
    so a kernel that reads a slot it should not is caught."""
    generator = torch.Generator().manual_seed(seed)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [(100 * torch.randn(shape, generator=generator)).to(dtype)
            for _ in range(num_layers)]
