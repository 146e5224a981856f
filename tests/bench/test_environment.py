"""The kvbm run's environment (profile, preset sizes, temporary disk directory), the event collector,
and the bench's knobs."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from kvbm_core.bench import build_config
from kvbm_core.bench.collector import TransferCollector, collector_for
from kvbm_core.bench.environment import kvbm_environment
from kvbm_core.errors import ConfigError
from kvbm_core.registry import Registry, default_registry


def enter(profile_flag=None, preset_profile="cpu", variables=None):
    return kvbm_environment(default_registry(), profile_flag, "embedded", preset_profile,
                            variables or {"DYN_KVBM_CPU_CACHE_GB": "0.05"})


def test_with_nothing_set_the_preset_profile_and_sizes_apply_and_are_restored():
    with enter() as env:
        assert os.environ["DYN_KVBM_PROFILE"] == "cpu"
        assert os.environ["DYN_KVBM_CPU_CACHE_GB"] == "0.05"
        assert env.set_by_bench == {"DYN_KVBM_PROFILE": "preset embedded", "DYN_KVBM_CPU_CACHE_GB": "preset embedded"}
        assert [(t.kind, t.capacity_gb) for t in env.resolved.settings.tiers] == [("cpu", 0.05)]
        assert env.temporary_disk_dir is None
    assert "DYN_KVBM_PROFILE" not in os.environ and "DYN_KVBM_CPU_CACHE_GB" not in os.environ


def test_a_variable_the_user_set_wins_over_the_preset_size(monkeypatch):
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "0.02")
    with enter() as env:
        assert os.environ["DYN_KVBM_CPU_CACHE_GB"] == "0.02"
        assert env.resolved.settings.tiers[0].capacity_gb == 0.02
        assert "DYN_KVBM_CPU_CACHE_GB" not in env.set_by_bench
    assert os.environ["DYN_KVBM_CPU_CACHE_GB"] == "0.02"


def test_a_profile_of_the_users_choosing_runs_without_the_preset_sizes(monkeypatch):
    monkeypatch.setenv("DYN_KVBM_PROFILE", "cpu")
    with enter() as env:
        assert env.set_by_bench == {}
        assert env.resolved.settings.tiers[0].capacity_gb == 4  # the profile's own size
    with enter(profile_flag="cpu") as env:
        assert env.set_by_bench == {"DYN_KVBM_PROFILE": "--profile"}
        assert env.resolved.settings.tiers[0].capacity_gb == 4
    assert os.environ["DYN_KVBM_PROFILE"] == "cpu"


def test_a_disk_tier_gets_a_temporary_directory_that_is_removed_afterwards(monkeypatch):
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_GB", "0.01")
    with enter(preset_profile="cpu_disk") as env:
        temporary = env.temporary_disk_dir
        assert temporary is not None and Path(temporary).is_dir()
        assert os.environ["DYN_KVBM_DISK_CACHE_DIR"] == temporary
        assert env.resolved.settings.disk.directory == temporary
        (Path(temporary) / "left-behind").write_bytes(b"x")
    assert not Path(temporary).exists()
    assert "DYN_KVBM_DISK_CACHE_DIR" not in os.environ


def test_a_disk_directory_the_user_set_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(tmp_path))
    with enter(preset_profile="cpu_disk") as env:
        assert env.temporary_disk_dir is None
        assert env.resolved.settings.disk.directory == str(tmp_path)
    assert tmp_path.is_dir()


def test_the_collector_totals_transfers_and_hits_from_event_hooks():
    registry = Registry(load_entry_points=False)
    collector = collector_for(registry)
    assert collector_for(registry) is collector  # registered once
    registry.notify("kvbm_blocks_offloaded", route="d2h", num_blocks=4, num_bytes=4000, seconds=0.002)
    registry.notify("kvbm_blocks_offloaded", route="d2h", num_blocks=2, num_bytes=2000, seconds=0.001)
    registry.notify("kvbm_blocks_onboarded", tier="cpu", request_id=5, num_blocks=3, num_bytes=3000, seconds=0.001)
    registry.notify("kvbm_request_finished", request_id=5, queried_blocks=10, host_hit_blocks=3, disk_hit_blocks=2)
    registry.notify("kvbm_request_finished", request_id=6, queried_blocks=10, host_hit_blocks=1, disk_hit_blocks=0)
    t = collector.totals()
    assert (t.offload["d2h"].ops, t.offload["d2h"].blocks, t.offload["d2h"].bytes) == (2, 6, 6000)
    assert t.offload["d2h"].gb_per_s == pytest.approx(6000 / 0.003 / 1e9)
    assert t.onboard["cpu"].gb_per_s == pytest.approx(3000 / 0.001 / 1e9)
    assert (t.requests, t.host_hit_rate, t.disk_hit_rate) == (2, 0.2, 0.1)
    collector.reset()
    assert collector.totals() == TransferCollector().totals()


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"num_device_blocks": 10}, "--num-device-blocks"),
        ({"max_num_tokens": 100}, "--max-num-tokens"),
        ({"model": "gpt-5"}, "--model"),
        ({"device": "tpu"}, "--device"),
        ({"tokens_per_block": 24}, "--tokens-per-block"),
        ({"users": 0}, "--users"),
        ({"model_mode": "approximate"}, "--model-mode"),
    ],
)
def test_bench_knobs_are_checked_before_anything_runs(overrides, flag):
    with pytest.raises(ConfigError) as err:
        build_config("embedded", overrides)
    assert err.value.source == flag


def test_presets_fill_every_knob_and_flags_override_them():
    embedded = build_config("embedded", {"users": 3, "qps": None})
    assert embedded.users == 3 and embedded.qps == 4.0
    executor = embedded.executor_config()
    assert executor.max_seq_len == embedded.workload().max_sequence_tokens
    assert executor.max_num_tokens >= embedded.workload().max_prompt_tokens
    assert build_config("embedded", {"model_mode": "batch_invariant"}).executor_config().model_mode == "batch_invariant"
    long_input = build_config("long-input", {})
    assert (long_input.users, long_input.system_tokens, long_input.history_tokens, long_input.answer_tokens) == (
        15, 1000, 20000, 100)
    assert long_input.model == "llama-3-8b" and long_input.device == "cuda"
    per_user = long_input.workload().max_sequence_tokens // long_input.tokens_per_block
    assert long_input.num_device_blocks < long_input.users * per_user  # the device pool overflows
    assert math.isinf(build_config("no-reuse", {}).qps)
    with pytest.raises(ConfigError, match="--preset"):
        build_config("nope", {})
