"""KVCacheManager unit tests: allocation, reference counts, prefix cache, LRU eviction, accounting."""

import pytest

from k2serve.worker.kv_cache import KVCacheManager, block_hash


def make_cache(num_blocks=8, block_size=4, prefix=True):
    return KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix)


def test_allocate_grows_table_and_free_returns_blocks():
    kv = make_cache()
    assert kv.allocate("a", 5)
    assert len(kv.block_table("a")) == 2
    assert kv.allocate("a", 8) and len(kv.block_table("a")) == 2
    assert kv.allocate("a", 9) and len(kv.block_table("a")) == 3
    assert kv.num_free_blocks == 5 and kv.usage == pytest.approx(3 / 8)
    kv.free("a")
    assert kv.num_free_blocks == 8 and kv.usage == 0.0
    kv.check_invariants()


def test_allocate_fails_without_side_effects_when_out_of_blocks():
    kv = make_cache(num_blocks=3)
    assert kv.allocate("a", 8)
    assert not kv.allocate("b", 8)
    assert not kv.has_request("b") and kv.num_free_blocks == 1
    kv.check_invariants()


def test_chained_hash_depends_on_parent():
    assert block_hash(None, [1, 2]) != block_hash(block_hash(None, [0, 0]), [1, 2])
    assert block_hash(None, [1, 2]) == block_hash(None, [1, 2])


def test_prefix_cache_shares_full_computed_blocks_only():
    kv = make_cache()
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    kv.allocate("a", 10)
    kv.cache_full_blocks("a", tokens, 10)
    hit = kv.find_cached_prefix(tokens + [99])
    assert hit == kv.block_table("a")[:2]
    assert kv.allocate("b", 11, hit)
    assert kv.block_table("b")[:2] == hit and kv.blocks[hit[0]].ref_count == 2
    assert kv.find_cached_prefix([0, 1, 2, 3, 7, 7, 7, 7, 1]) == hit[:1]
    kv.check_invariants()


def test_last_token_is_never_served_from_cache():
    kv = make_cache()
    tokens = list(range(8))
    kv.allocate("a", 8)
    kv.cache_full_blocks("a", tokens, 8)
    assert len(kv.find_cached_prefix(tokens)) == 1  # the second block holds the last token


def test_freed_cached_blocks_stay_findable_until_evicted_lru():
    kv = make_cache(num_blocks=4)
    tokens = list(range(8))
    kv.allocate("a", 8)
    kv.cache_full_blocks("a", tokens, 8)
    kv.free("a")
    assert len(kv.find_cached_prefix(tokens + [1])) == 2  # free but still cached
    assert kv.allocate("b", 8)  # takes the 2 never-used blocks first (LRU)
    assert len(kv.find_cached_prefix(tokens + [1])) == 2
    assert kv.allocate("c", 4)  # must evict: tail block of "a" goes first
    assert len(kv.find_cached_prefix(tokens + [1])) == 1
    kv.check_invariants()


def test_reusing_a_free_cached_block_counts_against_free_blocks():
    kv = make_cache(num_blocks=3)
    tokens = list(range(8))
    kv.allocate("a", 8)
    kv.cache_full_blocks("a", tokens, 8)
    kv.free("a")
    hit = kv.find_cached_prefix(tokens + [5])
    assert kv.can_allocate("b", 9, hit)  # 2 reclaimed + 1 fresh
    assert not kv.can_allocate("b", 13, hit)
    assert kv.allocate("b", 9, hit) and kv.num_free_blocks == 0
    kv.check_invariants()


def test_hit_rate_and_disabled_prefix_cache():
    kv = make_cache(prefix=False)
    kv.allocate("a", 8)
    kv.cache_full_blocks("a", list(range(8)), 8)
    assert kv.find_cached_prefix(list(range(9))) == []
    kv.record_lookup(10, 4)
    kv.record_lookup(10, 0)
    assert kv.hit_rate == pytest.approx(0.2)


def test_double_free_is_detected():
    kv = make_cache()
    kv.allocate("a", 4)
    kv.blocks[kv.block_table("a")[0]].ref_count = 0  # corrupt on purpose
    with pytest.raises(RuntimeError, match="freed twice"):
        kv.free("a")
