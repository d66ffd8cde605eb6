"""BlockPool: the KV cache's fixed-size blocks, their reference counts and the prefix hash map.

Rules (DESIGN.md §1):
- A block is *in use* while its reference count is > 0 (several requests sharing a
  prefix hold the same block, ref count > 1).
- A block whose count drops to 0 goes to the tail of the free queue. The free queue is
  LRU-ordered: new blocks are taken from its head, so the block freed longest ago is
  reused first.
- A full block may carry a *block hash* (see :func:`hash_block_tokens`). A hashed block
  stays findable in the hash map after it is freed: its KV is still valid until the
  block is taken from the free queue for a new allocation, which evicts the hash.
- Taking a hashed block out of the free queue for reuse is an eviction (a "page fault"
  in the metrics); finding it again through the hash map is a hit (see :meth:`touch`).

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
    """``num_blocks`` KV blocks with ref counts, an LRU free queue and a hash -> block map.

    All operations are O(1) per block. Block ids run from 0 to ``num_blocks - 1`` and all
    of them are usable (the runner pads block tables with 0 but masks by length).
    """

    def __init__(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._ref_cnt = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        # Insertion order = order of freeing; the head is the least recently used block.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.num_evictions = 0   # cached blocks taken for reuse (page faults)

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0 (cached or not): what an allocation may take."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks held by requests, 0..1."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable through the hash map (in use or free)."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_cnt[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._hash[block_id]

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def free_block_ids(self) -> list[int]:
        """The free queue, head (evicted next) first."""
        return list(self._free)

    def get_cached_block(self, block_hash: BlockHash) -> int | None:
        """The block holding KV for ``block_hash``, or None. Does not touch it."""
        return self._cached.get(block_hash)

    # ------------------------------------------------------------------ changes
    def get_new_blocks(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks from the head of the free queue, each with ref count 1.

        A taken block that still carried a hash loses it (eviction, counted in
        ``num_evictions``). Raises ``ValueError`` when fewer blocks are free: callers check
        ``num_free_blocks`` first.
        """
        if num_blocks > len(self._free):
            raise ValueError(f"asked for {num_blocks} KV blocks but only {len(self._free)} "
                             "are free; check num_free_blocks before allocating")
        taken = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self._ref_cnt[block_id] = 1
            taken.append(block_id)
        return taken

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on blocks found in the cache; free ones leave the free queue."""
        for block_id in block_ids:
            if self._ref_cnt[block_id] == 0:
                del self._free[block_id]
            self._ref_cnt[block_id] += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block, in the order given.

        Blocks reaching 0 join the tail of the free queue in that order, so the first block
        given is evicted first. Their hashes stay valid until eviction.
        """
        for block_id in block_ids:
            if self._ref_cnt[block_id] <= 0:
                raise ValueError(f"block {block_id} is freed more often than it was taken")
            self._ref_cnt[block_id] -= 1
            if self._ref_cnt[block_id] == 0:
                self._free[block_id] = None

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a full, computed block under ``block_hash``.

        Returns False (and changes nothing) when the block already has a hash or another
        block already holds that hash: the first copy stays the cached one, the duplicate is
        an ordinary block that is reused as soon as it is freed.
        """
        if self._hash[block_id] is not None or block_hash in self._cached:
            return False
        self._hash[block_id] = block_hash
        self._cached[block_hash] = block_id
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every hash (e.g. after an adapter is reloaded under the same name).

        Blocks in use keep their KV and owners; they simply stop being findable.
        """
        self._cached.clear()
        self._hash = [None] * self.num_blocks

    def _evict(self, block_id: int) -> None:
        block_hash = self._hash[block_id]
        if block_hash is None:
            return
        self._hash[block_id] = None
        if self._cached.get(block_hash) == block_id:
            del self._cached[block_hash]
        self.num_evictions += 1
