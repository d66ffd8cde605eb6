"""BlockPool: the KV cache's fixed-size blocks, their reference counts and the prefix hash map.

Rules (DESIGN.md §1):
- A block is *in use* while its reference count is > 0 (several requests sharing a
  prefix hold the same block, ref count > 1).
- A block whose count drops to 0 is free. Free blocks sit in one of three queues, and an
  allocation takes from them in this order:
  1. *warm*: freed blocks that hold no cached prefix, most recently freed first (LIFO).
     Their pages are already resident, so serving keeps reusing a small working set.
  2. *fresh*: blocks never handed out yet, lowest id first. On the CPU their pages are
     not resident until written (see ``platform.host.zeros_on_demand``), so they are taken
     only when the warm ones run out: resident memory follows the peak of blocks in use.
  3. *cached*: freed blocks that still carry a block hash, least recently freed first
     (LRU). Taking one evicts its hash; they go last because their KV may still be hit.
- A full block may carry a *block hash* (see :func:`hash_block_tokens`). A hashed block
  stays findable in the hash map after it is freed: its KV is still valid until the
  block is taken from the cached queue for a new allocation, which evicts the hash.
- Taking a hashed block for reuse is an eviction (a "page fault" in the metrics); finding
  it again through the hash map is a hit (see :meth:`touch`).

This module is pure Python (no torch): the pool only hands out ids; the runner owns the
tensors they index.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

BlockHash = bytes

_ROOT_PARENT = b"\x00" * 32   # stands in for the parent hash of a sequence's first block


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int],
                      extra_key: str | None = None) -> BlockHash:
    """Hash of one full block, chained from the hash of the block before it.

    Two blocks get the same hash only when their whole prefix (every earlier token), their
    own tokens and ``extra_key`` (e.g. a LoRA adapter name, whose KV differs) are equal.
    SHA-256 makes accidental collisions practically impossible. Every token is packed as
    8 bytes and a block always holds ``block_size`` tokens, so the framing is unambiguous.
    """
    digest = hashlib.sha256(parent_hash if parent_hash is not None else _ROOT_PARENT)
    digest.update(array("q", token_ids).tobytes())
    if extra_key is None:
        digest.update(b"\x00")
    else:
        digest.update(b"\x01" + extra_key.encode("utf-8"))
    return digest.digest()


class BlockPool:
    """``num_blocks`` KV blocks with ref counts, three free queues and a hash -> block map.

    All operations are O(1) per block. Block ids run from 0 to ``num_blocks - 1`` and all
    of them are usable (the runner pads block tables with 0 but masks by length).
    """

    def __init__(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._ref_cnt = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        # Free queues (see the module docstring); dicts for O(1) removal by id.
        self._warm: dict[int, None] = {}                      # uncached, popped LIFO
        self._fresh: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._lru: OrderedDict[int, None] = OrderedDict()     # cached; head = LRU
        self._cached: dict[BlockHash, int] = {}
        self.num_evictions = 0   # cached blocks taken for reuse (page faults)

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0 (cached or not): what an allocation may take."""
        return len(self._warm) + len(self._fresh) + len(self._lru)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Share of blocks held by requests, 0..1."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable through the hash map (in use or free)."""
        return len(self._cached)

    @property
    def num_never_used_blocks(self) -> int:
        """Blocks never handed out (on the CPU: pages not made resident by this pool)."""
        return len(self._fresh)

    def ref_count(self, block_id: int) -> int:
        return self._ref_cnt[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._hash[block_id]

    def is_free(self, block_id: int) -> bool:
        return self._ref_cnt[block_id] == 0

    def free_block_ids(self) -> list[int]:
        """Every free block, in the order allocations take them (next one first)."""
        return [*reversed(self._warm), *self._fresh, *self._lru]

    def get_cached_block(self, block_hash: BlockHash) -> int | None:
        """The block holding KV for ``block_hash``, or None. Does not touch it."""
        return self._cached.get(block_hash)

    # ------------------------------------------------------------------ changes
    def get_new_blocks(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` free blocks (warm, then fresh, then cached), each with ref count 1.

        A taken block that still carried a hash loses it (eviction, counted in
        ``num_evictions``). Raises ``ValueError`` when fewer blocks are free: callers check
        ``num_free_blocks`` first.
        """
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} KV blocks but only {self.num_free_blocks} "
                             "are free; check num_free_blocks before allocating")
        taken = []
        for _ in range(num_blocks):
            if self._warm:
                block_id, _ = self._warm.popitem()
            elif self._fresh:
                block_id, _ = self._fresh.popitem(last=False)
            else:
                block_id, _ = self._lru.popitem(last=False)
            self._evict(block_id)
            self._ref_cnt[block_id] = 1
            taken.append(block_id)
        return taken

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on blocks found in the cache; free ones leave their free queue."""
        for block_id in block_ids:
            if self._ref_cnt[block_id] == 0:
                self._unqueue(block_id)
            self._ref_cnt[block_id] += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block, in the order given.

        A cached block reaching 0 joins the tail of the cached (LRU) queue in that order, so
        the first one given is evicted first; its hash stays valid until eviction. An
        uncached one goes on top of the warm stack, to be reused first.
        """
        for block_id in block_ids:
            if self._ref_cnt[block_id] <= 0:
                raise ValueError(f"block {block_id} is freed more often than it was taken")
            self._ref_cnt[block_id] -= 1
            if self._ref_cnt[block_id] == 0:
                self._enqueue(block_id)

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a full, computed block under ``block_hash``.

        Returns False (and changes nothing) when the block already has a hash or another
        block already holds that hash: the first copy stays the cached one, the duplicate is
        an ordinary block that is reused as soon as it is freed.
        """
        if self._hash[block_id] is not None or block_hash in self._cached:
            return False
        is_free = self._ref_cnt[block_id] == 0
        if is_free:                           # a free block moves to the cached queue
            self._unqueue(block_id)
        self._hash[block_id] = block_hash
        self._cached[block_hash] = block_id
        if is_free:
            self._enqueue(block_id)
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every hash (e.g. after an adapter is reloaded under the same name).

        Blocks in use keep their KV and owners; they simply stop being findable. Free
        cached blocks become warm ones (their pages are resident).
        """
        self._cached.clear()
        self._hash = [None] * self.num_blocks
        while self._lru:
            block_id, _ = self._lru.popitem(last=False)
            self._warm[block_id] = None

    def _enqueue(self, block_id: int) -> None:
        """Queue a block whose ref count just reached 0 (it has been used: never fresh)."""
        if self._hash[block_id] is None:
            self._warm[block_id] = None
        else:
            self._lru[block_id] = None

    def _unqueue(self, block_id: int) -> None:
        """Take a free block out of whichever free queue holds it."""
        for queue in (self._warm, self._lru, self._fresh):
            if block_id in queue:
                del queue[block_id]
                return

    def _evict(self, block_id: int) -> None:
        block_hash = self._hash[block_id]
        if block_hash is None:
            return
        self._hash[block_id] = None
        if self._cached.get(block_hash) == block_id:
            del self._cached[block_hash]
        self.num_evictions += 1
