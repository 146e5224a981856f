"""Tier sizing and the WorkerConfig the leader hands to every rank."""

from __future__ import annotations

import pytest

from kvbm_core.errors import ConfigError
from kvbm_core.interfaces import TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.leader import BlockManager
from kvbm_core.leader.tiers import bytes_per_slot, slots_for
from kvbm_core.settings.model import KvbmSettings, TierSpec

# Llama-3-8B shape: 32 layers, K and V, 8 KV heads x 128 x 32 tokens, bf16 = 4 MiB per block
LAYOUT = BlockLayout(num_layers=32, kv_factor=2, elems_per_block=8 * 128 * 32, dtype="bfloat16", tokens_per_block=32)


def manager(registry, tiers, world_size=1) -> BlockManager:
    return BlockManager(KvbmSettings.model_validate({"tiers": tiers}), LAYOUT, world_size=world_size,
                        model_id="m", registry=registry)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_capacity_is_decimal_gigabytes_across_ranks(registry, world_size):
    bm = manager(registry, [{"kind": "cpu", "capacity_gb": 4}], world_size)
    assert LAYOUT.bytes_per_block == 4 * 1024 * 1024
    (host,) = bm.worker_config.tiers
    assert host.num_slots == 4_000_000_000 // (LAYOUT.bytes_per_block * world_size)
    assert bm.host.num_slots == host.num_slots and bm.disk is None


def test_the_override_wins_and_the_disk_tier_uses_its_plugins_slot_size(registry):
    bm = manager(registry, [{"kind": "cpu", "capacity_gb": 4, "num_blocks": 123}, {"kind": "disk", "capacity_gb": 8}])
    cpu, disk = bm.worker_config.tiers
    assert (cpu.kind, cpu.level, cpu.num_slots) == ("cpu", TierLevel.HOST, 123)
    disk_cls = registry.types("tier")["disk"].cls
    per_slot = bytes_per_slot(disk_cls, LAYOUT)
    assert per_slot >= LAYOUT.bytes_per_block
    assert (disk.kind, disk.level, disk.num_slots) == ("disk", TierLevel.DISK, 8_000_000_000 // per_slot)


def test_fractional_capacity_is_not_lost_to_float_rounding(registry):
    cls = registry.types("tier")["cpu"].cls
    layout = BlockLayout(num_layers=1, kv_factor=1, elems_per_block=50, dtype="float16", tokens_per_block=4)
    assert slots_for(TierSpec(kind="cpu", capacity_gb=0.3), cls, layout, 1) == 3_000_000  # 0.3e9 / 100 B


def test_a_tier_smaller_than_one_block_is_a_clear_error(registry):
    with pytest.raises(ConfigError, match=r"tiers\.cpu\.capacity_gb"):
        manager(registry, [{"kind": "cpu", "capacity_gb": 0.001}], world_size=8)


def test_worker_config_names_the_namespace(registry):
    a = manager(registry, [{"kind": "cpu", "num_blocks": 8}], world_size=2)
    b = manager(registry, [{"kind": "cpu", "num_blocks": 8}], world_size=4)
    assert a.worker_config.world_size == 2 and len(a.worker_config.namespace) == 16
    assert a.worker_config.namespace == a.namespace.digest != b.worker_config.namespace
    assert a.worker_config.tier_at(TierLevel.HOST).num_slots == 8
    assert a.worker_config.tier_at(TierLevel.DISK) is None
