"""BlockPool: ref counts, LRU free queue, prefix hash map and eviction (pure Python)."""
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


def test_free_queue_is_lru_block_freed_first_is_reused_first():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    pool.free_blocks([blocks[2], blocks[0]])
    pool.free_blocks([blocks[3]])
    pool.free_blocks([blocks[1]])
    assert pool.free_block_ids() == [2, 0, 3, 1]
    assert pool.get_new_blocks(2) == [2, 0]
    assert pool.get_new_blocks(2) == [3, 1]


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
