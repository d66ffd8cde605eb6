"""BlockPool: ref counts, free queues (warm uncached LIFO, never used, cached LRU), hash map."""
import pytest

from ferry.engine.block_pool import BlockPool, hash_block_tokens


def test_new_blocks_come_from_the_free_queue_with_ref_count_one():
    pool = BlockPool(4)
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    taken = pool.get_new_blocks(3)
    assert taken == [0, 1, 2]
    assert [pool.ref_count(b) for b in range(4)] == [1, 1, 1, 0]
    assert pool.num_free_blocks == 1
    assert pool.usage == pytest.approx(0.75)


def test_asking_for_more_blocks_than_free_raises_and_changes_nothing():
    pool = BlockPool(2)
    pool.get_new_blocks(1)
    with pytest.raises(ValueError, match="only 1 are free"):
        pool.get_new_blocks(2)
    assert pool.num_free_blocks == 1


def test_shared_block_is_free_only_when_every_holder_released_it():
    pool = BlockPool(3)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])                      # a second request shares it
    assert pool.ref_count(block) == 2
    pool.free_blocks([block])
    assert pool.ref_count(block) == 1 and not pool.is_free(block)
    pool.free_blocks([block])
    assert pool.ref_count(block) == 0 and pool.is_free(block)
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([block])


def test_uncached_freed_blocks_are_reused_last_freed_first():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(4)                 # 0..3; 4 and 5 never used
    pool.free_blocks([blocks[2], blocks[0]])
    pool.free_blocks([blocks[3]])
    pool.free_blocks([blocks[1]])
    # Warm blocks (their pages are resident) first, newest on top; then the fresh ones.
    assert pool.free_block_ids() == [1, 3, 0, 2, 4, 5]
    assert pool.num_never_used_blocks == 2
    assert pool.get_new_blocks(2) == [1, 3]
    assert pool.get_new_blocks(3) == [0, 2, 4]
    assert pool.num_never_used_blocks == 1


def test_never_used_blocks_are_taken_only_when_no_freed_block_is_left():
    pool = BlockPool(8)
    first = pool.get_new_blocks(2)
    pool.free_blocks(first)
    assert pool.get_new_blocks(3) == [1, 0, 2]      # two warm, then the lowest fresh id


def test_serving_churn_touches_only_the_peak_working_set():
    """Requests that come and go reuse the same few blocks: the pool's other blocks (on
    the CPU: pages never made resident) stay untouched however long it runs."""
    import random
    rng = random.Random(0)
    pool = BlockPool(1024)
    touched: set[int] = set()
    live: list[list[int]] = []
    peak = 0
    for _ in range(5000):
        if live and (len(live) >= 8 or rng.random() < 0.5):
            pool.free_blocks(reversed(live.pop(rng.randrange(len(live)))))
        else:
            table = pool.get_new_blocks(rng.randint(1, 6))
            touched.update(table)
            live.append(table)
        peak = max(peak, pool.num_used_blocks)
    assert peak <= 8 * 6
    assert len(touched) == peak                     # never more blocks than ever held at once
    assert pool.num_never_used_blocks == 1024 - peak


def test_cached_blocks_are_evicted_last_and_in_lru_order():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(6)
    hashes = [hash_block_tokens(None, [i]) for i in range(3)]
    for block, block_hash in zip(blocks[:3], hashes):
        assert pool.cache_block(block, block_hash)
    pool.free_blocks([blocks[1], blocks[4]])        # cached 1, then plain 4
    pool.free_blocks([blocks[0], blocks[2], blocks[5]])
    pool.free_blocks([blocks[3]])
    # Uncached: 3, 5, 4 (LIFO); cached: 1, 0, 2 (least recently freed first).
    assert pool.free_block_ids() == [3, 5, 4, 1, 0, 2]
    assert pool.get_new_blocks(3) == [3, 5, 4] and pool.num_evictions == 0
    assert pool.get_new_blocks(2) == [1, 0] and pool.num_evictions == 2
    assert pool.get_cached_block(hashes[1]) is None and pool.get_cached_block(hashes[0]) is None
    assert pool.get_cached_block(hashes[2]) == 2    # the most recently freed survives


def test_a_hit_block_freed_again_moves_to_the_lru_tail():
    pool = BlockPool(3)
    a, b = pool.get_new_blocks(2)
    hash_a, hash_b = hash_block_tokens(None, [1]), hash_block_tokens(None, [2])
    pool.cache_block(a, hash_a)
    pool.cache_block(b, hash_b)
    pool.free_blocks([a, b])                        # LRU: a, b
    pool.touch([pool.get_cached_block(hash_a)])     # a prefix hit on a
    pool.free_blocks([a])                           # LRU: b, a
    assert pool.get_new_blocks(2) == [2, b]         # fresh 2, then the LRU cached block
    assert pool.get_cached_block(hash_a) == a


def test_reset_prefix_cache_makes_free_cached_blocks_warm():
    pool = BlockPool(4)
    (block,) = pool.get_new_blocks(1)
    pool.cache_block(block, hash_block_tokens(None, [1]))
    pool.free_blocks([block])
    pool.reset_prefix_cache()
    assert pool.free_block_ids()[0] == block        # reused before the fresh blocks
    assert pool.get_new_blocks(1) == [block] and pool.num_evictions == 0


def test_freed_cached_block_stays_findable_until_an_allocation_needs_it():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    hash_a = hash_block_tokens(None, [1, 2])
    hash_b = hash_block_tokens(hash_a, [3, 4])
    assert pool.cache_block(a, hash_a) and pool.cache_block(b, hash_b)
    pool.free_blocks([b, a])                 # free queue: 2, 3, b, a
    assert pool.get_cached_block(hash_a) == a and pool.get_cached_block(hash_b) == b

    assert pool.get_new_blocks(2) == [2, 3]  # uncached blocks go first: no eviction
    assert pool.num_evictions == 0
    assert pool.get_cached_block(hash_a) == a

    assert pool.get_new_blocks(1) == [b]     # now a cached block must be reused
    assert pool.num_evictions == 1
    assert pool.get_cached_block(hash_b) is None and pool.block_hash(b) is None
    assert pool.get_cached_block(hash_a) == a


def test_touching_a_free_cached_block_takes_it_out_of_the_free_queue():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    block_hash = hash_block_tokens(None, [7, 8])
    pool.cache_block(block, block_hash)
    pool.free_blocks([block])
    assert pool.num_free_blocks == 2

    hit = pool.get_cached_block(block_hash)
    pool.touch([hit])
    assert pool.ref_count(hit) == 1 and pool.num_free_blocks == 1
    assert pool.get_new_blocks(1) == [1 - block]   # the hit block is not handed out
    assert pool.num_evictions == 0


def test_duplicate_hash_keeps_the_first_block_cached():
    pool = BlockPool(3)
    first, second = pool.get_new_blocks(2)
    block_hash = hash_block_tokens(None, [5, 5])
    assert pool.cache_block(first, block_hash)
    assert not pool.cache_block(second, block_hash)
    assert pool.get_cached_block(block_hash) == first
    assert pool.block_hash(second) is None
    # Reusing the uncached duplicate is not an eviction.
    pool.free_blocks([second])
    pool.get_new_blocks(2)
    assert pool.num_evictions == 0 and pool.get_cached_block(block_hash) == first


def test_hash_is_chained_over_the_whole_prefix_and_extra_key():
    root_1 = hash_block_tokens(None, [1, 2, 3])
    root_2 = hash_block_tokens(None, [1, 2, 4])
    assert root_1 == hash_block_tokens(None, [1, 2, 3])
    assert root_1 != root_2
    # Same tokens, different earlier block -> different hash.
    assert hash_block_tokens(root_1, [9, 9, 9]) != hash_block_tokens(root_2, [9, 9, 9])
    assert hash_block_tokens(root_1, [9, 9, 9]) == hash_block_tokens(root_1, [9, 9, 9])
    # The extra key (LoRA name) separates otherwise equal blocks; None differs from "".
    keys = {hash_block_tokens(None, [1, 2, 3], extra) for extra in (None, "", "a", "b")}
    assert len(keys) == 4
    # Large token ids are not truncated.
    assert hash_block_tokens(None, [2**40]) != hash_block_tokens(None, [0])


def test_reset_prefix_cache_forgets_hashes_but_keeps_blocks_in_use():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    block_hash = hash_block_tokens(None, [1])
    pool.cache_block(block, block_hash)
    pool.reset_prefix_cache()
    assert pool.get_cached_block(block_hash) is None
    assert pool.ref_count(block) == 1 and pool.num_cached_blocks == 0


def test_bad_num_blocks_is_rejected():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)
