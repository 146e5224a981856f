"""kvbm's TRT-LLM connector end to end on the reference executor: tokens and KV bytes equal the
run without the connector, for every profile and engine mode, under device eviction pressure."""

from __future__ import annotations

import pytest

from engine_runs import conversations, executor_config

from kvbm_core.ops import Route

CPU = [{"kind": "cpu", "num_blocks": 256}]
CPU_DISK = [{"kind": "cpu", "num_blocks": 12}, {"kind": "disk", "num_blocks": 256}]
DISK_ONLY = [{"kind": "disk", "num_blocks": 256}]
NO_FILTER = {"DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}


def test_cpu_profile_onboards_evicted_prefixes(kvbm_run):
    result = kvbm_run(conversations(), CPU)
    result.assert_same_tokens()
    assert result.kvbm.counters.evicted_blocks > 0
    assert result.kvbm.counters.oracle_checked_tokens > 0
    assert result.stats.offload_blocks_d2h > 0
    assert result.stats.onboard_blocks_h2d > 0
    assert sum(r.connector_tokens for r in result.kvbm.requests) > 0
    assert not any(r.async_load for r in result.kvbm.requests)  # host-only matches load synchronously


def test_cpu_disk_profile_moves_blocks_to_disk_and_back(kvbm_run):
    result = kvbm_run(conversations(), CPU_DISK, env=NO_FILTER)
    result.assert_same_tokens()
    assert result.stats.offload_blocks_h2disk > 0
    assert result.stats.staged_blocks_disk2h > 0  # disk blocks were staged into the host, verified...
    assert not any(r.async_load for r in result.kvbm.requests)  # ...so every promise loads synchronously


def test_cpu_disk_profile_with_frequency_filter_keeps_single_use_blocks_off_disk(kvbm_run):
    result = kvbm_run(conversations(turns=1), CPU_DISK)
    result.assert_same_tokens()
    assert result.stats.offload_blocks_d2h > 0
    # Every block was offered once (stored to host) and the filter admits from the second offer;
    # only the shared system prompt, offered by every user, may reach the disk.
    shared_blocks = 48 // 16
    assert result.stats.offload_blocks_h2disk <= shared_blocks


def test_disk_only_profile_stages_through_a_small_host_tier(kvbm_run):
    result = kvbm_run(conversations(), DISK_ONLY)
    result.assert_same_tokens()
    assert result.stats.offload_blocks_d2h > 0 and result.stats.offload_blocks_h2disk > 0
    assert result.stats.onboard_blocks_h2d > 0
    (host, disk) = result.executor.scheduler._manager.worker_config.tiers
    assert (host.kind, disk.kind) == ("cpu", "disk") and host.spec is not None  # the leader added it


@pytest.mark.parametrize(
    "mode",
    [
        {"tp_size": 2},
        {"enable_chunked_prefill": True, "max_num_tokens": 48},
        {"overlap_scheduler": True},
        {"cuda_graphs": True},
        {"trtllm": "1.3", "overlap_scheduler": True, "tp_size": 2},
    ],
    ids=["tp2", "chunked-prefill", "overlap", "cuda-graph-like", "1.3-overlap-tp2"],
)
@pytest.mark.parametrize("tiers", [CPU, CPU_DISK], ids=["cpu", "cpu_disk"])
def test_engine_modes(kvbm_run, mode, tiers):
    result = kvbm_run(conversations(), tiers, config=executor_config(**mode), env=NO_FILTER)
    result.assert_same_tokens()
    assert result.stats.onboard_blocks_h2d > 0


def test_cancellations_before_and_during_decode(kvbm_run):
    specs = conversations(users=3)
    from dataclasses import replace

    specs[1] = replace(specs[1], cancel_after_tokens=0)  # cancelled as soon as it holds blocks
    specs[4] = replace(specs[4], cancel_after_tokens=2)  # cancelled mid-decode
    result = kvbm_run(specs, CPU)
    result.assert_same_tokens()
    assert result.kvbm.requests[1].cancelled and result.kvbm.requests[4].cancelled


def test_disk_hits_are_staged_under_the_overlap_scheduler(kvbm_run):
    tiny_host = [{"kind": "cpu", "num_blocks": 4}, {"kind": "disk", "num_blocks": 256}]
    result = kvbm_run(conversations(), tiny_host, config=executor_config(overlap_scheduler=True), env=NO_FILTER)
    result.assert_same_tokens()
    assert result.stats.staged_blocks_disk2h > 0
    assert result.kvbm.counters.async_saves == 0 and result.kvbm.pinned_blocks == 0


def test_cpu_disk_uses_only_its_routes(kvbm_run):
    result = kvbm_run(conversations(), CPU_DISK, env=NO_FILTER)
    stats = result.stats
    assert stats.failed_ops == 0
    used = {route for route, blocks in stats.blocks.items() if blocks}
    assert used == {Route.D2H, Route.H2D, Route.H2DISK, Route.DISK2H}  # routes between neighbours only
