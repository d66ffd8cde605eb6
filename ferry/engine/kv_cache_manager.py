"""KVCacheManager: each request's block table and its share of the automatic prefix cache.

The scheduler talks to this class only; the :class:`BlockPool` below it owns the blocks.
Per request it keeps the block table (a list of block ids, token ``p`` lives in block
``table[p // block_size]``) and the chained hashes of the request's full blocks, computed
incrementally as tokens arrive.

Admission of a request follows three calls::

    blocks, num_hit = manager.get_computed_blocks(request)        # longest cached prefix
    if manager.allocate_slots(request, num_new_tokens, blocks):   # table covers hit + new
        request.num_computed_tokens = num_hit
    ...                                                           # after scheduling a step:
    manager.cache_full_blocks(request)                            # register new full blocks

NOTE: ``allocate_slots`` counts ``computed_blocks`` on top of ``request.num_computed_tokens``:
set ``num_computed_tokens`` to the hit only after the allocation succeeded.
"""
from __future__ import annotations

from typing import Protocol

from ferry.engine.block_pool import BlockHash, BlockPool, hash_block_tokens


class _RequestLike(Protocol):
    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int
    lora_name: str | None

    @property
    def cache_salt(self) -> str | None: ...

    @property
    def num_tokens(self) -> int: ...


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Block tables per request on top of one :class:`BlockPool`.

    Counters for the metrics: ``prefix_cache_queries`` (tokens looked up),
    ``prefix_cache_hits`` (of those, tokens found cached) and ``page_faults`` (cached blocks
    evicted to serve an allocation). A lookup is counted once per admission: its numbers
    are committed when ``allocate_slots`` succeeds for that request, so a request that waits
    several steps for free blocks is not counted again on every retry.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.block_pool = BlockPool(num_blocks)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}
        self._num_registered: dict[str, int] = {}     # leading blocks already offered to the cache
        self._pending_lookup: dict[str, tuple[int, int]] = {}   # request -> (queried, hit) tokens
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ------------------------------------------------------------------ gauges and counters
    @property
    def usage(self) -> float:
        """Share of blocks held by requests, 0..1."""
        return self.block_pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def page_faults(self) -> int:
        return self.block_pool.num_evictions

    @property
    def hit_ratio(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (the live list: read it, do not change it); [] if none."""
        return self._tables.get(request_id, [])

    # ------------------------------------------------------------------ the three calls
    def get_computed_blocks(self, request: _RequestLike) -> tuple[list[int], int]:
        """Longest cached prefix of the request's FULL blocks: (block ids, number of tokens).

        The hit covers at most ``request.num_tokens - 1`` tokens: the last token is always
        computed, since its logits give the next token. The blocks are not referenced yet:
        pass them to :meth:`allocate_slots`.
        """
        if not self.enable_prefix_caching or self._tables.get(request.request_id):
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in self._block_hashes(request, max_hit_blocks)[:max_hit_blocks]:
            block_id = self.block_pool.get_cached_block(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        num_hit_tokens = len(hits) * self.block_size
        self._pending_lookup[request.request_id] = (request.num_tokens, num_hit_tokens)
        return hits, num_hit_tokens

    def blocks_needed(self, request: _RequestLike, num_new_tokens: int,
                      computed_blocks: list[int] | None = None) -> int:
        """Free blocks :meth:`allocate_slots` would take for these arguments (new blocks
        plus cached hits that sit in the free queue)."""
        computed = computed_blocks or []
        table = self._tables.get(request.request_id, [])
        num_covered = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        num_missing = max(0, _cdiv(num_covered, self.block_size) - len(table) - len(computed))
        return num_missing + sum(1 for b in computed if self.block_pool.ref_count(b) == 0)

    def allocate_slots(self, request: _RequestLike, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> bool:
        """Grow the request's table to cover its computed tokens, the hit and ``num_new_tokens``.

        Covered tokens: ``request.num_computed_tokens + len(computed_blocks) * block_size +
        num_new_tokens``. ``computed_blocks`` (from :meth:`get_computed_blocks`) is only
        allowed while the request holds no blocks. Returns False, changing nothing, when
        the free blocks do not suffice. Taking a free block that still held a cached hash
        evicts it (a page fault).
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        request_id = request.request_id
        computed = list(computed_blocks or [])
        table = self._tables.get(request_id, [])
        if computed and table:
            raise ValueError(f"request {request_id!r} already holds blocks; computed_blocks "
                             "may only be given on its first allocation")
        num_covered = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        num_missing = max(0, _cdiv(num_covered, self.block_size) - len(table) - len(computed))
        # Cached hits sitting in the free queue leave it when touched: they are not free for us.
        num_hits_in_free_queue = sum(1 for b in computed if self.block_pool.ref_count(b) == 0)
        if num_missing > self.block_pool.num_free_blocks - num_hits_in_free_queue:
            return False
        self.block_pool.touch(computed)
        table = self._tables.setdefault(request_id, table)
        table.extend(computed)
        table.extend(self.block_pool.get_new_blocks(num_missing))
        if computed:
            self._num_registered[request_id] = len(computed)   # already in the hash map
        self._commit_lookup(request_id)
        return True

    def cache_full_blocks(self, request: _RequestLike) -> None:
        """Register the request's newly full, computed blocks in the prefix cache.

        Call after ``request.num_computed_tokens`` was advanced for a step.
        """
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(request.request_id)
        if not table:
            return
        # With async scheduling the last computed position may hold a token still being
        # sampled on the device: only blocks of known tokens can be hashed.
        num_known = min(request.num_computed_tokens, request.num_tokens)
        num_full = min(num_known // self.block_size, len(table))
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for index in range(start, num_full):
            self.block_pool.cache_block(table[index], hashes[index])
        self._num_registered[request.request_id] = num_full

    def trim(self, request: _RequestLike, num_tokens: int) -> None:
        """Free the blocks past the first ``num_tokens`` tokens of the request (rejected
        draft tokens): last block first. Those blocks hold no cached token: a block is
        registered only once every token in it is known and computed."""
        table = self._tables.get(request.request_id)
        if not table:
            return
        keep = _cdiv(num_tokens, self.block_size)
        if keep < len(table):
            self.block_pool.free_blocks(reversed(table[keep:]))
            del table[keep:]

    def free(self, request: _RequestLike) -> None:
        """Drop the request's blocks, last block first, so its tail is evicted before its head.

        Cached blocks keep their hashes and can still be hit until they are reused.
        """
        request_id = request.request_id
        self.block_pool.free_blocks(reversed(self._tables.pop(request_id, [])))
        self._hashes.pop(request_id, None)
        self._num_registered.pop(request_id, None)
        self._pending_lookup.pop(request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget all cached hashes (blocks in use keep working)."""
        self.block_pool.reset_prefix_cache()

    # ------------------------------------------------------------------ helpers
    def _block_hashes(self, request: _RequestLike, num_blocks: int) -> list[BlockHash]:
        """The chained hashes of the request's first full blocks, extended up to ``num_blocks``."""
        hashes = self._hashes.setdefault(request.request_id, [])
        num_blocks = min(num_blocks, request.num_tokens // self.block_size)
        tokens, size = request.all_token_ids, self.block_size
        while len(hashes) < num_blocks:
            start = len(hashes) * size
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, tokens[start:start + size], request.cache_salt))
        return hashes

    def _commit_lookup(self, request_id: str) -> None:
        queried, hit = self._pending_lookup.pop(request_id, (0, 0))
        self.prefix_cache_queries += queried
        self.prefix_cache_hits += hit
