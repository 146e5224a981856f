"""The leader's tiers, built once from the resolved settings: sizes, policies, the disk filter.

- **Sizing.** A tier's slot count is its ``num_blocks`` override when set, else
  ``floor(capacity_gb * 1e9 / (bytes_per_slot * world_size))``: GB are decimal and cover the whole
  engine instance, every rank storing its own shard of each block. ``bytes_per_slot`` is the tier
  plugin's figure (``StorageTier.bytes_per_slot(layout)`` where the plugin defines it, e.g. a disk
  record with its header; otherwise ``layout.bytes_per_block``). A capacity below one slot is a
  :class:`~kvbm_core.errors.ConfigError` naming the tier.
- **Routes** follow :func:`~kvbm_core.settings.pipeline.plan_pipeline`: host only, host + disk,
  disk only.
- **Eviction**: one ``settings.eviction`` policy instance per tier, built by the registry (a
  constructor failure names the distribution); core's ``lru`` takes over a tier whose policy
  misbehaves (:mod:`~kvbm_core.leader.tier_state`).
- **Disk filter**: ``settings.disk_offload_filter.name`` from the registry, only when both a host
  and a disk tier exist and the filter is enabled; it sees host -> disk offers only, through
  :class:`~kvbm_core.leader.disk_offload.CheckedAdmission`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvbm_core.channel import TierAllocation
from kvbm_core.errors import ConfigError
from kvbm_core.interfaces import TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.leader.disk_offload import CheckedAdmission
from kvbm_core.leader.tier_state import TierState
from kvbm_core.lru import PriorityLruEviction
from kvbm_core.registry import Registry
from kvbm_core.settings.model import KvbmSettings, TierSpec
from kvbm_core.settings.pipeline import PipelinePlan, plan_pipeline


def bytes_per_slot(tier_cls: type, layout: BlockLayout) -> int:
    per_slot = getattr(tier_cls, "bytes_per_slot", None)
    return int(per_slot(layout)) if callable(per_slot) else layout.bytes_per_block


def slots_for(spec: TierSpec, tier_cls: type, layout: BlockLayout, world_size: int) -> int:
    """How many block slots ``spec`` gives one rank (see the module docstring)."""
    if spec.num_blocks is not None:
        return int(spec.num_blocks)
    per_slot = bytes_per_slot(tier_cls, layout)
    capacity_bytes = round(float(spec.capacity_gb or 0) * 1e9)
    slots = capacity_bytes // (per_slot * world_size)
    if slots <= 0:
        raise ConfigError(
            f"tiers.{spec.kind}.capacity_gb",
            f"{spec.capacity_gb} GB holds no block: one block takes {per_slot} bytes on each of {world_size} ranks",
            f"at least {per_slot * world_size / 1e9:.6f}",
        )
    return int(slots)


@dataclass(frozen=True)
class LeaderTiers:
    """What :func:`build_tiers` assembled."""

    plan: PipelinePlan
    host: TierState | None
    disk: TierState | None
    allocations: tuple[TierAllocation, ...]
    disk_filter: CheckedAdmission | None
    read_gbps: dict[str, float]


def build_tiers(settings: KvbmSettings, layout: BlockLayout, world_size: int, registry: Registry,
                clock: Callable[[], float]) -> LeaderTiers:
    plan = plan_pipeline(settings, registry)
    tier_types = registry.types("tier")
    policy = registry.entry("eviction", settings.eviction, "eviction")
    states: dict[TierLevel, TierState] = {}
    allocations: list[TierAllocation] = []
    read_gbps: dict[str, float] = {}
    for spec in (plan.host, plan.disk):
        if spec is None:
            continue
        cls = tier_types[spec.kind].cls
        num_slots = slots_for(spec, cls, layout, world_size)
        level = TierLevel(cls.level)
        states[level] = TierState(
            spec.kind, level, num_slots,
            registry.create("eviction", policy.name, "eviction", num_slots, settings.eviction_options),
            policy_distribution=policy.distribution, fallback=PriorityLruEviction,
        )
        allocations.append(TierAllocation(spec.kind, level, num_slots))
        read_gbps[spec.kind] = float(cls.read_gbps)
    disk_filter = None
    if plan.disk_filter is not None:
        key = "disk_offload_filter.name"
        admission = registry.create("filter", plan.disk_filter, key, settings.disk_offload_filter.options, clock=clock)
        disk_filter = CheckedAdmission(admission, registry.entry("filter", plan.disk_filter, key).distribution)
    return LeaderTiers(plan, states.get(TierLevel.HOST), states.get(TierLevel.DISK), tuple(allocations),
                       disk_filter, read_gbps)
