"""The reference executor without a connector: correct tokens, device reuse, eviction, admission."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from kvbm_core.testing import ExecutorConfig, ReferenceExecutor, RequestSpec, greedy_decode

CFG = ExecutorConfig(tokens_per_block=16, num_blocks=64, max_seq_len=256, max_batch_size=4)


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


def _expected(executor: ReferenceExecutor, specs: list[RequestSpec]) -> list[tuple[int, ...]]:
    return [tuple(greedy_decode(executor.model, s.prompt, s.max_new_tokens)) for s in specs]


SHARED = _tokens(70, seed=1)
MIXED = [
    RequestSpec(SHARED + _tokens(9, 2), 6),
    RequestSpec(_tokens(5, 3), 7),
    RequestSpec(_tokens(120, 4), 1),
    RequestSpec(SHARED + _tokens(30, 5), 5, arrival_step=3),  # arrives after the first prefill
    RequestSpec(SHARED[:64], 4, arrival_step=4),  # block-aligned: the last block is recomputed
]


@pytest.mark.parametrize(
    "overlap, chunked",
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["plain", "overlap", "chunked", "overlap-chunked"],
)
def test_tokens_equal_a_greedy_decode_without_any_cache(overlap: bool, chunked: bool) -> None:
    cfg = replace(
        CFG,
        overlap_scheduler=overlap,
        enable_chunked_prefill=chunked,
        max_num_tokens=48 if chunked else 8192,
        oracle=True,
    )
    executor = ReferenceExecutor(cfg)
    result = executor.run(MIXED)
    assert result.tokens() == _expected(executor, MIXED)
    assert [r.device_reused_tokens for r in result.requests] == [0, 0, 0, 64, 48]
    assert result.counters.oracle_checked_tokens == 64 + 48
    assert result.counters.computed_prompt_tokens == sum(len(s.prompt) for s in MIXED) - 64 - 48
    assert all(r.ttft_s is not None and r.ttft_s > 0 for r in result.requests)


def test_device_reuse_across_runs_until_eviction() -> None:
    executor = ReferenceExecutor(replace(CFG, num_blocks=16, oracle=True))
    prompt = _tokens(70, seed=6)  # four full blocks and a partial one
    first = executor.run([RequestSpec(prompt, 3)])
    assert first.counters.device_reused_blocks == 0
    assert first.counters.stored_blocks == 4

    again = executor.run([RequestSpec(prompt + [7, 7], 3)])
    assert again.requests[0].device_reused_tokens == 64
    assert again.counters.oracle_checked_tokens == 64

    others = [RequestSpec(_tokens(100, seed=10 + i), 2) for i in range(3)]
    churn = executor.run(others)
    assert churn.counters.evicted_blocks > 0

    late = [RequestSpec(prompt + [7, 7], 3)]
    after = executor.run(late)
    assert after.requests[0].device_reused_tokens < 64
    assert after.tokens() == _expected(executor, late) == again.tokens()


def test_admission_guarantees_blocks_for_the_whole_request() -> None:
    executor = ReferenceExecutor(replace(CFG, num_blocks=8, enable_block_reuse=False))
    specs = [RequestSpec(_tokens(70, seed=20 + i), 8) for i in range(3)]  # 78 tokens: 5 of 8 blocks each
    result = executor.run(specs)
    assert result.tokens() == _expected(executor, specs)
    a, b, c = result.requests
    assert a.finish_s <= b.first_token_s and b.finish_s <= c.first_token_s  # one at a time
    assert executor.kv_manager.num_available_blocks == 8


def test_cancelled_requests_stop_and_free_their_blocks() -> None:
    executor = ReferenceExecutor(CFG)
    prompt = _tokens(40, seed=30)
    specs = [RequestSpec(prompt, 10, cancel_after_tokens=3), RequestSpec(_tokens(20, seed=31), 4)]
    result = executor.run(specs)
    first, second = result.requests
    assert first.cancelled and first.tokens == tuple(greedy_decode(executor.model, prompt, 3))
    assert not second.cancelled and len(second.tokens) == 4
    assert executor.kv_manager.num_available_blocks == CFG.num_blocks


def test_arrival_by_time_counts_ttft_from_arrival() -> None:
    executor = ReferenceExecutor(CFG)
    result = executor.run([RequestSpec(_tokens(30, seed=40), 2, arrival_time_s=0.05)])
    (r,) = result.requests
    assert r.arrival_s == 0.05
    assert r.first_token_s is not None and r.first_token_s >= 0.05
    assert 0 < r.ttft_s < r.first_token_s
