"""Building one rank's tiers from the leader's :class:`~kvbm_core.channel.WorkerConfig`.

Each tier is constructed through the registry (``kind`` -> plugin class, checked against the storage
contract of its level, a failure naming the distribution) with a
:class:`~kvbm_core.interfaces.TierContext`; the worker never imports a tier plugin by name. If one
tier fails to build, the ones already built are closed before the error propagates.
"""

from __future__ import annotations

import torch

from kvbm_core.errors import ConfigError
from kvbm_core.interfaces import StorageTier, TierContext, TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.ops import WorkerConfig
from kvbm_core.registry import Registry


def build_tiers(config: WorkerConfig, layout: BlockLayout, rank: int, device: torch.device | None,
                registry: Registry) -> dict[TierLevel, StorageTier]:
    """Allocate this rank's storage for every tier the leader sized, host first."""
    if device is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # tiers bind to one GPU by index
    tiers: dict[TierLevel, StorageTier] = {}
    try:
        for allocation in sorted(config.tiers, key=lambda t: t.level):
            spec = allocation.spec or config.settings.tier(allocation.kind)
            if spec is None:
                raise ConfigError(f"tiers.{allocation.kind}", "the leader sized a tier the settings do not list")
            cls = registry.get("tier", allocation.kind, f"tiers.{allocation.kind}.kind")
            if cls.level != allocation.level:
                raise ConfigError(f"tiers.{allocation.kind}", f"plugin level {cls.level!r} differs from the "
                                                              f"leader's {allocation.level!r}")
            if allocation.level in tiers:
                raise ConfigError("tiers", f"two tiers at level {allocation.level.name}")
            context = TierContext(spec=spec, layout=layout, num_slots=allocation.num_slots, rank=rank,
                                  world_size=config.world_size, namespace=config.namespace, device=device,
                                  settings=config.settings)
            tiers[allocation.level] = registry.create("tier", allocation.kind, f"tiers.{allocation.kind}.kind", context)
    except BaseException:
        for tier in tiers.values():
            registry.close(tier)
        raise
    return tiers
