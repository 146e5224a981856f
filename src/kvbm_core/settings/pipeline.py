"""The data path a resolved configuration describes: which routes exist and which one is filtered.

The seed guide's three shapes, decided by the levels of the configured tiers alone. A disk block
reaches the device through the host (staged and verified before it is promised); blocks the host
has no room for when they are stored go straight to the disk (``d2disk``):

- host only:   offload device -> host (``d2h``); onboard host -> device (``h2d``).
- host + disk: offload ``d2h``, then host -> disk (``h2disk``) in the background behind the disk
  offload filter (frequency, on by default); onboard ``h2d``, disk blocks staged first (``disk2h``).
- disk only:   the same routes through a small host staging tier the leader adds
  (:mod:`kvbm_core.leader.tiers`), with no filter: every stored block goes on to the disk.

This module only describes; the block manager acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbm_core.errors import ConfigError
from kvbm_core.interfaces import TierLevel
from kvbm_core.ops import Route
from kvbm_core.registry import Registry, default_registry
from kvbm_core.settings.model import KvbmSettings, TierSpec

NO_TIER_HINT = "set DYN_KVBM_CPU_CACHE_GB and/or DYN_KVBM_DISK_CACHE_GB, or choose a profile with DYN_KVBM_PROFILE"


@dataclass(frozen=True)
class PipelinePlan:
    """The tiers by level and the routes between them; ``disk_filter`` names the filter on ``h2disk``."""

    host: TierSpec | None
    disk: TierSpec | None
    offload: tuple[Route, ...]
    onboard: tuple[Route, ...]
    disk_filter: str | None

    @property
    def shape(self) -> str:
        """``host``, ``host+disk``, ``disk`` or ``none``."""
        return "+".join(n for n, t in (("host", self.host), ("disk", self.disk)) if t is not None) or "none"

    def describe(self) -> str:
        """One line for humans, e.g. ``offload d2h (cpu), h2disk (disk, filter frequency); onboard disk2h, h2d``."""
        if self.shape == "none":
            return f"no tier configured: the connector refuses to start ({NO_TIER_HINT})"
        host = self.host.kind if self.host is not None else "host staging"
        disk = self.disk.kind if self.disk is not None else ""
        dest = {Route.D2H: host, Route.H2DISK: disk, Route.D2DISK: f"{disk}, when the host is full"}
        offload = []
        for route in self.offload:
            extra = f", filter {self.disk_filter}" if route == Route.H2DISK and self.disk_filter else ""
            offload.append(f"{route.label} ({dest[route]}{extra})")
        return f"offload {', '.join(offload)}; onboard {', '.join(r.label for r in self.onboard)}"

    def require_tiers(self) -> None:
        """Raise :class:`ConfigError` when no tier is configured (the connector cannot run so)."""
        if self.shape == "none":
            raise ConfigError("tiers", f"no KV cache tier is configured: {NO_TIER_HINT}")


def plan_pipeline(settings: KvbmSettings, registry: Registry | None = None) -> PipelinePlan:
    """Derive the routes from the tiers' levels (as validated by ``resolve_settings``)."""
    types = (registry or default_registry()).types("tier")
    by_level = {types[t.kind].cls.level: t for t in settings.tiers}
    host, disk = by_level.get(TierLevel.HOST), by_level.get(TierLevel.DISK)
    offload: list[Route] = []
    onboard: list[Route] = []
    disk_filter = None
    if host is not None or disk is not None:
        offload.append(Route.D2H)
    if disk is not None:
        offload += [Route.H2DISK, Route.D2DISK]
        onboard.append(Route.DISK2H)
        if host is not None and settings.disk_offload_filter.enabled:
            disk_filter = settings.disk_offload_filter.name
    if host is not None or disk is not None:
        onboard.append(Route.H2D)
    return PipelinePlan(host, disk, tuple(offload), tuple(onboard), disk_filter)
