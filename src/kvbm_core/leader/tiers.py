"""The leader's tiers, built once from the resolved settings: sizes, policies, the disk filter.

- **Sizing.** A tier's slot count is its ``num_blocks`` override when set, else
  ``floor(capacity_gb * 1e9 / (bytes_per_slot * world_size))``: GB are decimal and cover the whole
  engine instance, every rank storing its own shard of each block. ``bytes_per_slot`` is the tier
  plugin's figure (``StorageTier.bytes_per_slot(layout)`` where the plugin defines it, e.g. a disk
  record with its header; otherwise ``layout.bytes_per_block``). A capacity below one slot is a
  :class:`~kvbm_core.errors.ConfigError` naming the tier.
- **Routes** run between neighbouring tiers (device <-> host <-> disk). A disk-only pipeline
  gets a host tier all the same: a *staging* tier of at most :data:`STAGING_GB` (never more than
  the disk tier), built from the installed host-level tier plugin. Disk blocks are staged into it,
  verified, before they are promised, and every stored block passes through it on its way to disk
  (with no admission filter, as the disk-only shape has none).
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

from kvbm_core.errors import ConfigError
from kvbm_core.interfaces import TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.leader.disk_offload import CheckedAdmission
from kvbm_core.leader.tier_state import TierState
from kvbm_core.lru import PriorityLruEviction
from kvbm_core.ops import TierAllocation
from kvbm_core.registry import Registry
from kvbm_core.settings.model import KvbmSettings, TierSpec
from kvbm_core.settings.pipeline import PipelinePlan, plan_pipeline

STAGING_GB = 1.0
"""Host memory (decimal GB per engine instance) that stages disk blocks when no host tier is set."""

PREFERRED_HOST_KIND = "cpu"


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


def staging_spec(disk: TierSpec, disk_slots: int, layout: BlockLayout, world_size: int,
                 registry: Registry) -> TierSpec:
    """The host tier that stages a disk-only pipeline's blocks (see the module docstring)."""
    tier_types = registry.types("tier")
    hosts = sorted(name for name, entry in tier_types.items() if entry.cls.level == TierLevel.HOST)
    if not hosts:
        raise ConfigError(f"tiers.{disk.kind}", "a disk tier stages its blocks through host memory, and no "
                                                "host-level tier plugin is installed (install kvbm-tier-cpu)")
    kind = PREFERRED_HOST_KIND if PREFERRED_HOST_KIND in hosts else hosts[0]
    per_slot = bytes_per_slot(tier_types[kind].cls, layout) * world_size
    slots = max(1, min(disk_slots, int(STAGING_GB * 1e9) // per_slot))
    return TierSpec(kind=kind, num_blocks=slots)


def build_tiers(settings: KvbmSettings, layout: BlockLayout, world_size: int, registry: Registry,
                clock: Callable[[], float], host_grows: bool = False) -> LeaderTiers:
    """The leader's view of every tier. ``host_grows``: the host tier starts with no usable slot and
    grows as every rank reports its storage ready (:meth:`BlockManager.tier_ready`)."""
    plan = plan_pipeline(settings, registry)
    tier_types = registry.types("tier")
    policy = registry.entry("eviction", settings.eviction, "eviction")
    states: dict[TierLevel, TierState] = {}
    allocations: list[TierAllocation] = []
    read_gbps: dict[str, float] = {}
    specs: list[tuple[TierSpec, bool]] = [(spec, False) for spec in (plan.host, plan.disk) if spec is not None]
    if plan.host is None and plan.disk is not None:
        disk_slots = slots_for(plan.disk, tier_types[plan.disk.kind].cls, layout, world_size)
        specs.insert(0, (staging_spec(plan.disk, disk_slots, layout, world_size, registry), True))
    for spec, staging in specs:
        cls = tier_types[spec.kind].cls
        num_slots = slots_for(spec, cls, layout, world_size)
        level = TierLevel(cls.level)
        states[level] = TierState(
            spec.kind, level, num_slots,
            registry.create("eviction", policy.name, "eviction", num_slots, settings.eviction_options),
            policy_distribution=policy.distribution, fallback=PriorityLruEviction,
            usable=0 if host_grows and level == TierLevel.HOST else None,
        )
        allocations.append(TierAllocation(spec.kind, level, num_slots, spec if staging else None))
        read_gbps[spec.kind] = float(cls.read_gbps)
    disk_filter = None
    if plan.disk_filter is not None:
        key = "disk_offload_filter.name"
        admission = registry.create("filter", plan.disk_filter, key, settings.disk_offload_filter.options, clock=clock)
        disk_filter = CheckedAdmission(admission, registry.entry("filter", plan.disk_filter, key).distribution)
    return LeaderTiers(plan, states.get(TierLevel.HOST), states.get(TierLevel.DISK), tuple(allocations),
                       disk_filter, read_gbps)
