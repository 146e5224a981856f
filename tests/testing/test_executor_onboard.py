"""End to end: KV saved by one engine and onboarded by another equals recomputation, bit for bit.

The recording connector keeps whole blocks in memory: the first executor computes and saves them,
a second executor (a fresh pool, as after restarting the engine) loads them instead of computing.
The oracle compares every onboarded block with recomputation, layer by layer, before the layer
reads it; the tokens must equal a greedy decode without any cache.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from kvbm_core.testing import (
    ExecutorConfig,
    ModelShape,
    OracleMismatch,
    ReferenceExecutor,
    RequestSpec,
    greedy_decode,
)

from .recording_connector import Options, make_connector

CFG = ExecutorConfig(tokens_per_block=16, num_blocks=48, max_seq_len=256, max_batch_size=4, oracle=True)


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


PREFIX = _tokens(80, seed=1)
FIRST = [RequestSpec(PREFIX + _tokens(10, 2), 4), RequestSpec(_tokens(50, 3), 3)]
SECOND = [RequestSpec(PREFIX + _tokens(25, 4), 5), RequestSpec(PREFIX[:40] + _tokens(9, 5), 3, arrival_step=1)]


def _expected(executor: ReferenceExecutor, specs: list[RequestSpec]) -> list[tuple[int, ...]]:
    return [tuple(greedy_decode(executor.model, s.prompt, s.max_new_tokens)) for s in specs]


@pytest.mark.parametrize(
    "async_load, overlap, chunked, tp",
    [
        (False, False, False, 1),
        (True, False, False, 1),
        (False, True, True, 1),
        (True, True, False, 2),
        (False, False, True, 2),
    ],
    ids=["sync", "async", "sync-overlap-chunked", "async-overlap-tp2", "sync-chunked-tp2"],
)
def test_onboarded_kv_equals_recomputation(async_load: bool, overlap: bool, chunked: bool, tp: int) -> None:
    cfg = replace(
        CFG,
        overlap_scheduler=overlap,
        enable_chunked_prefill=chunked,
        max_num_tokens=32 if chunked else 8192,
        tp_size=tp,
    )
    options = Options(async_load=async_load, finish_delay=1, lag=1)
    scheduler, worker, shared = make_connector(options)
    before = ReferenceExecutor(cfg, connector=(scheduler, worker))
    assert before.run(FIRST).tokens() == _expected(before, FIRST)

    after = ReferenceExecutor(cfg, connector=(scheduler, worker), model=before.model)
    result = after.run(SECOND)
    assert result.tokens() == _expected(after, SECOND)
    first, second = result.requests
    assert (first.connector_tokens, first.async_load) == (80, async_load)
    assert second.connector_tokens + second.device_reused_tokens == 32  # device reuse of onboarded blocks, or a load
    assert result.counters.oracle_checked_tokens == 80 + 32


def test_onboard_after_device_eviction() -> None:
    cfg = replace(CFG, num_blocks=12)
    scheduler, worker, _ = make_connector(Options())
    executor = ReferenceExecutor(cfg, connector=(scheduler, worker))
    prompt = PREFIX + [1, 2, 3]
    executor.run([RequestSpec(prompt, 3)])
    churn = executor.run([RequestSpec(_tokens(120, seed=10 + i), 2) for i in range(2)])
    assert churn.counters.evicted_blocks > 0
    again = [RequestSpec(prompt + [4], 6)]
    result = executor.run(again)
    (r,) = result.requests
    assert r.device_reused_tokens + r.connector_tokens == 80 and r.connector_tokens > 0
    assert result.tokens() == _expected(executor, again)


def test_cache_salt_separates_prefixes() -> None:
    scheduler, worker, _ = make_connector(Options())
    executor = ReferenceExecutor(CFG, connector=(scheduler, worker))
    executor.run([RequestSpec(PREFIX + [9], 2, cache_salt="alice")])
    result = executor.run(
        [RequestSpec(PREFIX + [9], 2, cache_salt="bob"), RequestSpec(PREFIX + [8], 2, cache_salt="alice")]
    )
    bob, alice = result.requests
    assert bob.device_reused_tokens + bob.connector_tokens == 0
    assert alice.device_reused_tokens == 80


def test_a_connector_that_skips_its_loads_is_caught() -> None:
    scheduler, worker, _ = make_connector(Options(drop_loads=True))
    before = ReferenceExecutor(CFG, connector=(scheduler, worker))
    before.run(FIRST)
    checked = ReferenceExecutor(CFG, connector=(scheduler, worker), model=before.model)
    with pytest.raises(OracleMismatch, match=r"request 1: K of layer 0 on rank 0 differs .* from token position 0"):
        checked.run(SECOND)

    unchecked = ReferenceExecutor(replace(CFG, oracle=False), connector=(scheduler, worker), model=before.model)
    assert unchecked.run(SECOND).tokens() != _expected(unchecked, SECOND)  # the model really reads the pool


def test_the_gpu_code_path_on_cpu_bf16_sdpa_and_a_tolerant_oracle() -> None:
    shape = ModelShape("small-bf16", 512, 64, 2, 4, 2, 16, 128, dtype="bfloat16", qk_norm=True)
    cfg = replace(
        CFG, model=shape, model_mode="fast", oracle_tolerance=0.05, enable_chunked_prefill=True, max_num_tokens=48
    )
    scheduler, worker, _ = make_connector(Options())
    before = ReferenceExecutor(cfg, connector=(scheduler, worker))
    assert before.pools.tensors[0].dtype == torch.bfloat16 and before.llm_args.kv_cache_dtype == "bfloat16"
    before.run(FIRST)
    result = ReferenceExecutor(cfg, connector=(scheduler, worker), model=before.model).run(SECOND)
    assert result.requests[0].connector_tokens == 80 and result.counters.oracle_checked_tokens == 112
    assert all(len(r.tokens) == s.max_new_tokens for r, s in zip(result.requests, SECOND, strict=True))
