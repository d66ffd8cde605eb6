"""Paged-attention test cases shared by the kernel backends' tests: random scattered
caches with their metadata, and a naive float64 oracle written from the definition."""
from __future__ import annotations

import torch

from ferry.kernels.attn_metadata import AttentionMetadata

TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
BLOCK = 4   # page size of the tests: small, so short sequences cross several pages


def make_batch(query_lens: list[int], seq_lens: list[int], num_kv_heads: int, head_dim: int,
               dtype: torch.dtype, device: str, seed: int = 0, num_blocks: int = 0,
               block_size: int = BLOCK):
    """Random cache and metadata; pages of each sequence scattered over the cache."""
    gen = torch.Generator().manual_seed(seed)
    pages = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = max(num_blocks, sum(pages) + 3)
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max(pages) + 1, dtype=torch.int32)  # one spare column
    taken = 0
    for i, n in enumerate(pages):
        tables[i, :n] = order[taken:taken + n]
        taken += n
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    starts = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(query_lens), dtype=torch.int64, device=device),
        query_start_loc=starts.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device), query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens),
        num_decodes=_leading_decodes(query_lens), block_size=block_size)
    return meta, cache.to(device)


def _leading_decodes(query_lens: list[int]) -> int:
    """The runner puts decodes (query_len 1) first; a later 1-token chunk is a prefill."""
    count = 0
    while count < len(query_lens) and query_lens[count] == 1:
        count += 1
    return count


def naive_attention(query, kv_cache, meta, scale, window):
    """Token by token, head by head, in float64: the definition, nothing clever."""
    out = torch.zeros(query.shape, dtype=torch.float64)
    q64, cache = query.double().cpu(), kv_cache.double().cpu()
    tables = meta.block_tables.cpu().long()
    group = query.shape[1] // kv_cache.shape[3]
    for seq, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        start = int(meta.query_start_loc[seq])
        positions = torch.arange(seq_len)
        blocks = tables[seq, positions // meta.block_size]
        keys = cache[0, blocks, positions % meta.block_size]       # (S, Hkv, D)
        values = cache[1, blocks, positions % meta.block_size]     # (S, Hkv, D)
        for i in range(q_len):
            p = seq_len - q_len + i
            visible = positions <= p
            if window is not None:
                visible &= positions > p - window
            for h in range(query.shape[1]):
                scores = keys[visible, h // group] @ q64[start + i, h] * scale     # (S',)
                out[start + i, h] = torch.softmax(scores, 0) @ values[visible, h // group]
    return out


def check(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected, atol=tol, rtol=tol)


# Decodes at page-boundary lengths (1, BLOCK-1, BLOCK, BLOCK+1, long), then prefills: a
# fresh prompt, one crossing a page, a chunk on a cached prefix, a 1-token chunk on a prefix.
MIXED_QUERY_LENS = [1, 1, 1, 1, 1, 7, BLOCK + 1, 6, 1]
MIXED_SEQ_LENS = [1, BLOCK - 1, BLOCK, BLOCK + 1, 23, 7, BLOCK + 1, 19, 10]
