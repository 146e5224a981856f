"""The V1 KV cache manager: whole-block prefix reuse, eviction order, decode blocks, pinning."""

from __future__ import annotations

from kvbm_core.testing import KvCacheManager

TPB = 4


def _same(priority: int = 35):
    return lambda i: priority


def _finish(m: KvCacheManager, rid: int, tokens: list[int], priority: int = 35, pin: bool = False) -> None:
    m.release(rid, tokens, len(tokens), _same(priority), pin=pin)


def test_reuse_matches_whole_blocks_and_leaves_one_token_to_compute() -> None:
    m = KvCacheManager(num_blocks=16, tokens_per_block=TPB)
    prompt = list(range(12))  # three full blocks
    assert m.add_sequence(1, prompt, None, None) == (0, 0)
    first = m.get_cache_indices(1)
    _finish(m, 1, prompt)
    assert m.num_cached_blocks == 3

    seen: list[int] = []
    reused, external = m.add_sequence(2, prompt, None, lambda n: seen.append(n) or 0)
    assert (reused, external, seen) == (8, 0, [8])  # the last block would leave nothing to compute
    assert m.get_cache_indices(2)[:2] == first[:2]

    reused, _ = m.add_sequence(3, list(range(9)) + [99], None, None)  # diverges inside block 2
    assert reused == 8
    reused, _ = m.add_sequence(4, prompt + [1], "salted", None)  # another salt, another tree
    assert reused == 0
    assert m.stats.reused_blocks == 4


def test_decode_allocates_a_block_when_a_position_starts_one() -> None:
    m = KvCacheManager(num_blocks=8, tokens_per_block=TPB)
    m.add_sequence(1, [1, 2, 3, 4, 5, 6], None, None)  # positions 0..5: two blocks
    new = [m.add_token(1) for _ in range(4)]  # positions 6, 7, 8, 9
    assert [b is not None for b in new] == [False, False, True, False]
    assert len(m.get_cache_indices(1)) == 3


def test_eviction_takes_lowest_priority_then_oldest_then_deepest() -> None:
    m = KvCacheManager(num_blocks=9, tokens_per_block=TPB)
    old, low, new = list(range(100, 108)), list(range(0, 8)), list(range(200, 208))
    for rid, tokens, priority in ((1, old, 50), (2, low, 10), (3, new, 50)):
        m.add_sequence(rid, tokens, None, None)
        _finish(m, rid, tokens, priority)
    assert (m.num_cached_blocks, m.num_available_blocks) == (6, 9)

    m.add_sequence(4, list(range(300, 316)), None, None)  # 3 free blocks + the deepest low-priority one
    assert m.stats.evicted_blocks == 1
    assert m.add_sequence(5, low + [0], None, None)[0] == 4  # its first block survived
    assert m.stats.evicted_blocks == 3  # then both blocks of the older prefix
    m.release(4, [], 0, _same())  # nothing valid to cache: straight back to the free list
    assert m.add_sequence(6, old + [0], None, None)[0] == 0
    assert m.add_sequence(7, new + [0], None, None)[0] == 8


def test_pinned_blocks_stay_out_of_reach_until_unpinned() -> None:
    m = KvCacheManager(num_blocks=4, tokens_per_block=TPB)
    tokens = list(range(10))  # three blocks, the last partial
    m.add_sequence(1, tokens, None, None)
    _finish(m, 1, tokens, pin=True)
    assert m.num_available_blocks == 1
    assert m.add_sequence(2, tokens, None, None)[0] == 8  # pinned but cached: still shareable
    m.unpin(1)
    assert m.num_available_blocks == 1  # request 2 holds the two shared blocks and one fresh one
    _finish(m, 2, tokens)
    assert m.num_available_blocks == 4
