"""kvbm inside TensorRT-LLM's own call sites, on both lines: what an external conformance run found.

- Saves of many requests that finish in one iteration never leave device blocks pinned, even under
  1.2's unpin loop that releases one request per poll.
- Requests with different cache salts never share a block, whether the request object carries the
  salt string (1.3) or only the runtime's integer id (1.2).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from engine_runs import executor_config, settle

from kvbm_core.identity import block_keys
from kvbm_core.testing import ReferenceExecutor, RequestSpec

CPU = [{"kind": "cpu", "num_blocks": 512}]
LINES = ["1.2", "1.3"]


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
@pytest.mark.parametrize("line", LINES)
def test_no_device_block_stays_pinned_when_64_requests_finish_together(kvbm_run, line, overlap):
    rng = np.random.default_rng(7)
    specs = [RequestSpec(rng.integers(1, 250, 40).tolist(), 1) for _ in range(64)]  # 64 prefills, one step
    config = executor_config(trtllm=line, overlap_scheduler=overlap, max_batch_size=64, num_blocks=256,
                             max_num_tokens=4096)
    result = kvbm_run(specs, CPU, config=config)
    result.assert_same_tokens()
    assert result.kvbm.pinned_blocks == 0 and result.kvbm.pending_saves == ()
    assert result.executor.kv_manager.num_available_blocks == config.num_blocks
    assert result.stats.offload_blocks_d2h == 64 * 2  # every full block was still stored


@pytest.mark.parametrize("line", LINES)
def test_different_cache_salts_never_share_a_block(kvbm_run, line):
    rng = np.random.default_rng(11)
    prompt = rng.integers(1, 250, 120).tolist()
    fillers = [RequestSpec(rng.integers(1, 250, 150).tolist(), 2, arrival_step=2 + i) for i in range(4)]
    later = 20  # the fillers have evicted the first request's device blocks by then
    specs = [
        RequestSpec(prompt + [5], 2, cache_salt="tenant-a"),
        *fillers,
        RequestSpec(prompt + [6], 2, cache_salt="tenant-b", arrival_step=later),
        RequestSpec(prompt + [7], 2, arrival_step=later + 1),
        RequestSpec(prompt + [8], 2, cache_salt="tenant-a", arrival_step=later + 2),
    ]
    result = kvbm_run(specs, CPU, config=executor_config(trtllm=line))
    result.assert_same_tokens()
    first, *_, other_salt, no_salt, same_salt = result.kvbm.requests
    assert first.connector_tokens == 0
    assert other_salt.connector_tokens == 0 and other_salt.device_reused_tokens == 0
    assert no_salt.connector_tokens == 0 and no_salt.device_reused_tokens == 0
    assert same_salt.connector_tokens + same_salt.device_reused_tokens == 112  # 7 full blocks of 16


def test_requests_with_another_lora_adapter_never_share_a_block(kvbm_run):
    rng = np.random.default_rng(12)
    prompt = rng.integers(1, 250, 120).tolist()
    fillers = [RequestSpec(rng.integers(1, 250, 150).tolist(), 2, arrival_step=2 + i) for i in range(4)]
    specs = [
        RequestSpec(prompt + [5], 2),
        *fillers,
        RequestSpec(prompt + [6], 2, lora_task_id=7, arrival_step=20),
        RequestSpec(prompt + [7], 2, arrival_step=21),
    ]
    result = kvbm_run(specs, CPU)
    result.assert_same_tokens()
    *_, adapter, plain = result.kvbm.requests
    assert adapter.connector_tokens == 0 and adapter.device_reused_tokens == 0
    assert plain.connector_tokens + plain.device_reused_tokens == 112


def test_generation_only_requests_are_refused_by_tensorrt_llm_1_2_before_kvbm_sees_them(kvbm_run):
    spec = RequestSpec(list(range(1, 60)), 2, generation_only=True)
    with pytest.raises(RuntimeError, match="not supported for generation-only requests"):
        kvbm_run([spec], CPU, config=replace(executor_config(), trtllm="1.2"))


@pytest.mark.parametrize("line", LINES)
def test_with_partial_reuse_copies_pinned_saves_are_all_released_one_per_poll(kvbm_run, line):
    """Partial reuse with copies makes kvbm pin finished requests; 1.2 releases one per poll, and kvbm
    hands them back one at a time, so none is lost: a request that needs the whole pool gets it."""
    rng = np.random.default_rng(9)
    batch = [RequestSpec(rng.integers(1, 250, 40).tolist(), 1) for _ in range(32)]  # 3 blocks each
    whole_pool = RequestSpec(rng.integers(1, 250, 96 * 16 - 8).tolist(), 1, arrival_step=3)
    config = executor_config(trtllm=line, max_batch_size=32, num_blocks=96, max_num_tokens=4096,
                             max_seq_len=96 * 16, enable_partial_reuse=True, idle_timeout_s=20.0)
    result = kvbm_run([*batch, whole_pool], CPU, config=config)
    result.assert_same_tokens()
    assert result.kvbm.counters.async_saves > 0  # kvbm did pin (its stores were in flight)
    assert result.stats.offload_blocks_d2h == 32 * 2 + (96 * 16 - 8) // 16


def test_disk_blocks_corrupted_while_serving_are_never_promised(kvbm_run, tmp_path):
    """Bits flipped in the disk file under a running engine: staging finds them before any promise,
    the blocks leave the disk tier, the requests compute them, the engine serves on."""
    tiny_host = [{"kind": "cpu", "num_blocks": 4}, {"kind": "disk", "num_blocks": 256}]
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 250, 100).tolist() for _ in range(3)]
    fillers = [RequestSpec(rng.integers(1, 250, 150).tolist(), 2, arrival_step=i) for i in range(4)]
    first = [RequestSpec(p + [1], 2) for p in prompts]
    returning = [RequestSpec(p + [2], 2) for p in prompts]
    later = fillers + [replace(s, arrival_step=8) for s in returning]
    no_filter = {"DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}
    clean = kvbm_run(first + [replace(s, arrival_step=s.arrival_step + 3) for s in later], tiny_host, env=no_filter)
    clean.assert_same_tokens()
    assert clean.stats.staged_blocks_disk2h > 0  # the later requests do come back from the disk

    for path in tmp_path.glob("kvbm-*-rank0.blocks"):
        path.unlink()  # a fresh disk file for the run that gets corrupted
    result = kvbm_run(first, tiny_host, env=no_filter)
    executor = result.executor
    (blocks_file,) = tmp_path.glob("kvbm-*-rank0.blocks")
    data = np.memmap(blocks_file, dtype=np.uint8, mode="r+")
    data[4096 + 1000 :: 4096 * 4] ^= 0x10  # one flipped byte in every record's data
    data.flush()
    del data
    baseline = ReferenceExecutor(executor.config, model=executor.model)
    expected = [baseline.run(fillers).tokens(), baseline.run(returning).tokens()]
    assert executor.run(fillers).tokens() == expected[0]  # they evict the prompts from the device
    settle(executor)  # and their copies to the tiny host tier and the disk are done: its slots are free
    again = executor.run(returning)
    settle(executor)
    stats = executor.scheduler.stats
    assert again.tokens() == expected[1] and not any(r.error for r in again.requests)
    assert stats.failed_ops > 0 and stats.staged_blocks_disk2h == 0  # every staging read failed its check
    assert sum(r.connector_tokens for r in again.requests) == 0  # nothing from the disk was promised


def test_a_host_tier_smaller_than_a_prompt_still_puts_the_whole_prefix_on_disk(kvbm_run):
    """3 host slots in front of a disk, a 6-block prompt: the blocks the host has no room for go
    straight to the disk, so the whole prefix is there; a later turn gets back as many as the host
    can stage at once (a promise only ever covers verified host blocks)."""
    rng = np.random.default_rng(6)
    prompt = rng.integers(1, 250, 6 * 16 + 5).tolist()
    fillers = [RequestSpec(rng.integers(1, 250, 150).tolist(), 2, arrival_step=2 + i) for i in range(4)]
    tiers = [{"kind": "cpu", "num_blocks": 3}, {"kind": "disk", "num_blocks": 64}]
    result = kvbm_run([RequestSpec(prompt, 1), *fillers], tiers, env={"DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"})
    result.assert_same_tokens()
    manager = result.executor.scheduler._manager
    assert (manager.disk.lookup(block_keys(manager.namespace, prompt)) >= 0).all()  # all 6 on disk
    assert result.stats.offload_blocks_d2disk > 0
    later = [RequestSpec(prompt + [7], 2)]
    expected = ReferenceExecutor(result.executor.config, model=result.executor.model).run(later).tokens()
    again = result.executor.run(later)
    assert again.tokens() == expected and again.requests[0].connector_tokens == 3 * 16
