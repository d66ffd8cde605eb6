"""KVCacheManager: block tables, prefix-cache lookups, stats and freeing order."""
import pytest

from ferry.engine.block_pool import hash_block_tokens
from ferry.engine.kv_cache_manager import KVCacheManager
from ferry.request import Request
from ferry.sampling_params import SamplingParams

BS = 4


def make_request(request_id, tokens, lora_name=None):
    return Request(request_id, list(tokens), SamplingParams(), lora_name=lora_name)


def admit(manager, request, num_new_tokens=None):
    """Look up, allocate and mark the whole request computed, as the scheduler does."""
    blocks, hit = manager.get_computed_blocks(request)
    if num_new_tokens is None:
        num_new_tokens = request.num_tokens - hit
    assert manager.allocate_slots(request, num_new_tokens, blocks)
    request.num_computed_tokens = hit + num_new_tokens
    manager.cache_full_blocks(request)
    return hit


def test_allocate_slots_grows_the_table_to_cover_the_tokens():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    request = make_request("a", range(10))
    assert manager.allocate_slots(request, 10)
    assert len(manager.get_block_ids("a")) == 3          # ceil(10 / 4)
    request.num_computed_tokens = 10
    assert manager.allocate_slots(request, 2)            # 12 tokens: still 3 blocks
    assert len(manager.get_block_ids("a")) == 3
    request.num_computed_tokens = 12
    assert manager.allocate_slots(request, 1)            # 13 tokens: a 4th block
    assert len(set(manager.get_block_ids("a"))) == 4
    assert manager.num_free_blocks == 4 and manager.usage == pytest.approx(0.5)


def test_allocate_slots_fails_without_changes_when_blocks_run_out():
    manager = KVCacheManager(num_blocks=3, block_size=BS)
    first = make_request("a", range(8))
    assert manager.allocate_slots(first, 8)
    second = make_request("b", range(100, 108))
    assert not manager.allocate_slots(second, 8)
    assert manager.get_block_ids("b") == [] and manager.num_free_blocks == 1


def test_same_prefix_hits_and_different_earlier_block_misses():
    manager = KVCacheManager(num_blocks=16, block_size=BS)
    first = make_request("a", list(range(10)))
    admit(manager, first)
    first_table = manager.get_block_ids("a")

    same_prefix = make_request("b", list(range(8)) + [50, 51, 52])
    blocks, hit = manager.get_computed_blocks(same_prefix)
    assert hit == 8 and blocks == first_table[:2]
    assert manager.allocate_slots(same_prefix, same_prefix.num_tokens - hit, blocks)
    assert manager.get_block_ids("b")[:2] == first_table[:2]
    assert [manager.block_pool.ref_count(b) for b in first_table[:2]] == [2, 2]

    # Same second block tokens, but the first block differs: the chain breaks at once.
    other_first = make_request("c", [99, 1, 2, 3] + list(range(4, 10)))
    assert manager.get_computed_blocks(other_first) == ([], 0)
    # Same tokens under another LoRA adapter: different KV, no hit.
    other_lora = make_request("d", list(range(10)), lora_name="adapter")
    assert manager.get_computed_blocks(other_lora) == ([], 0)


def test_hit_never_covers_the_last_token():
    manager = KVCacheManager(num_blocks=16, block_size=BS)
    admit(manager, make_request("a", range(12)))
    exact = make_request("b", range(8))                 # two full cached blocks
    blocks, hit = manager.get_computed_blocks(exact)
    assert hit == 4 and len(blocks) == 1                # the last block must be recomputed
    longer = make_request("c", range(9))
    assert manager.get_computed_blocks(longer)[1] == 8


def test_only_full_computed_blocks_are_cached():
    manager = KVCacheManager(num_blocks=16, block_size=BS)
    request = make_request("a", range(10))
    assert manager.allocate_slots(request, 6)          # chunk: 6 of 10 tokens computed
    request.num_computed_tokens = 6
    manager.cache_full_blocks(request)
    assert manager.block_pool.num_cached_blocks == 1
    probe = make_request("p", range(10))
    assert manager.get_computed_blocks(probe)[1] == 4
    assert manager.allocate_slots(request, 4)
    request.num_computed_tokens = 10
    manager.cache_full_blocks(request)
    assert manager.block_pool.num_cached_blocks == 2   # the partial 3rd block is never cached
    table = manager.get_block_ids("a")
    expected = hash_block_tokens(hash_block_tokens(None, range(4)), range(4, 8))
    assert manager.block_pool.block_hash(table[1]) == expected
    assert manager.block_pool.block_hash(table[2]) is None


def test_hit_on_blocks_in_the_free_queue_counts_them_as_taken():
    manager = KVCacheManager(num_blocks=3, block_size=BS)
    first = make_request("a", range(9))
    admit(manager, first)
    manager.free(first)
    assert manager.num_free_blocks == 3
    # 16 tokens: 2 blocks hit (both in the free queue) + 2 new, but only 1 other block exists.
    too_long = make_request("b", list(range(8)) + list(range(50, 58)))
    blocks, hit = manager.get_computed_blocks(too_long)
    assert hit == 8
    assert not manager.allocate_slots(too_long, too_long.num_tokens - hit, blocks)
    assert manager.num_free_blocks == 3
    assert all(manager.block_pool.ref_count(b) == 0 for b in range(3))
    fits = make_request("c", list(range(8)) + [60, 61, 62])
    blocks, hit = manager.get_computed_blocks(fits)
    assert manager.allocate_slots(fits, fits.num_tokens - hit, blocks)
    assert manager.num_free_blocks == 0 and manager.page_faults == 0


def test_lookup_stats_are_counted_once_per_admission():
    manager = KVCacheManager(num_blocks=4, block_size=BS)
    admit(manager, make_request("a", range(9)))
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (9, 0)
    hog = make_request("hog", range(100, 104))
    assert manager.allocate_slots(hog, 4)              # 0 blocks left
    waiter = make_request("b", list(range(8)) + [70, 71, 72, 73])
    for _ in range(3):                                 # retried while blocks are short
        blocks, hit = manager.get_computed_blocks(waiter)
        assert not manager.allocate_slots(waiter, waiter.num_tokens - hit, blocks)
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (9, 0)
    manager.free(hog)
    blocks, hit = manager.get_computed_blocks(waiter)
    assert manager.allocate_slots(waiter, waiter.num_tokens - hit, blocks)
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (9 + 12, 8)
    assert manager.hit_ratio == pytest.approx(8 / 21)


def test_free_releases_the_tail_before_the_head():
    manager = KVCacheManager(num_blocks=4, block_size=BS)
    request = make_request("a", range(12))
    admit(manager, request)
    table = list(manager.get_block_ids("a"))
    manager.free(request)
    assert manager.get_block_ids("a") == []
    assert manager.block_pool.free_block_ids() == [3] + table[::-1]
    assert manager.usage == 0.0


def test_cached_blocks_are_evicted_only_when_needed_and_counted_as_page_faults():
    manager = KVCacheManager(num_blocks=4, block_size=BS)
    first = make_request("a", range(9))                # 2 full cached blocks + 1 partial
    admit(manager, first)
    manager.free(first)
    new = make_request("b", range(100, 102))           # takes the free uncached block
    admit(manager, new)
    assert manager.page_faults == 0
    assert manager.get_computed_blocks(make_request("p", range(9)))[1] == 8
    bigger = make_request("c", range(200, 208))        # needs 2 blocks: partial + tail evicted
    admit(manager, bigger)
    assert manager.page_faults == 1
    # The tail (second) block went first; the head block is still a hit.
    assert manager.get_computed_blocks(make_request("q", range(9)))[1] == 4


def test_prefix_caching_disabled_never_hits():
    manager = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    admit(manager, make_request("a", range(9)))
    assert manager.get_computed_blocks(make_request("b", range(9))) == ([], 0)
    assert manager.block_pool.num_cached_blocks == 0
    assert manager.prefix_cache_queries == 0


def test_computed_blocks_only_on_first_allocation():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    admit(manager, make_request("a", range(9)))
    request = make_request("b", range(9))
    assert manager.allocate_slots(request, 1)
    with pytest.raises(ValueError, match="already holds blocks"):
        manager.allocate_slots(request, 1, [0])
    with pytest.raises(ValueError, match="num_new_tokens"):
        manager.allocate_slots(request, -1)
