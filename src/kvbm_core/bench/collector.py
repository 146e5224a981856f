"""An in-process kvbm plugin that totals the measured run's transfers and cache hits from event hooks.

It subscribes to ``kvbm_blocks_offloaded``, ``kvbm_blocks_onboarded`` and ``kvbm_request_finished``
(see :mod:`kvbm_core.hookspecs`), the same hooks the metrics exporter uses, so the figures are those
a user would see on the dashboard. It is registered once per process under :data:`PLUGIN_NAME`;
:meth:`TransferCollector.reset` starts a measurement.

Bandwidth is bytes over the summed durations of the operations (what one operation achieves;
operations that overlap in time are not merged). Hit rates are block-weighted over every request
finished since the reset: blocks found in the tier / blocks looked up beyond the device-cached prefix.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from kvbm_core import hookimpl
from kvbm_core.registry import Registry

PLUGIN_NAME = "kvbm-bench"


@dataclass(frozen=True)
class Flow:
    """Completed operations along one route (offload) or from one tier (onboard)."""

    ops: int
    blocks: int
    bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float | None:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else None


@dataclass(frozen=True)
class TransferTotals:
    offload: dict[str, Flow]  # by route label: d2h, h2disk, d2disk
    onboard: dict[str, Flow]  # by source tier kind: cpu, disk, ...
    requests: int  # requests finished (that entered the hit-rate accounting)
    queried_blocks: int
    host_hit_blocks: int
    disk_hit_blocks: int

    @property
    def host_hit_rate(self) -> float:
        return self.host_hit_blocks / self.queried_blocks if self.queried_blocks else 0.0

    @property
    def disk_hit_rate(self) -> float:
        return self.disk_hit_blocks / self.queried_blocks if self.queried_blocks else 0.0


class TransferCollector:
    """The plugin object; see the module docstring."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._offload: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
        self._onboard: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
        self._requests = self._queried = self._host = self._disk = 0

    @hookimpl
    def kvbm_blocks_offloaded(self, route: str, num_blocks: int, num_bytes: int, seconds: float) -> None:
        _add(self._offload[route], num_blocks, num_bytes, seconds)

    @hookimpl
    def kvbm_blocks_onboarded(self, tier: str, num_blocks: int, num_bytes: int, seconds: float) -> None:
        _add(self._onboard[tier], num_blocks, num_bytes, seconds)

    @hookimpl
    def kvbm_request_finished(self, queried_blocks: int, host_hit_blocks: int, disk_hit_blocks: int) -> None:
        self._requests += 1
        self._queried += queried_blocks
        self._host += host_hit_blocks
        self._disk += disk_hit_blocks

    def totals(self) -> TransferTotals:
        def flows(table: dict[str, list[float]]) -> dict[str, Flow]:
            return {k: Flow(int(v[0]), int(v[1]), int(v[2]), float(v[3])) for k, v in sorted(table.items())}

        return TransferTotals(flows(self._offload), flows(self._onboard), self._requests, self._queried,
                              self._host, self._disk)


def _add(entry: list[float], blocks: int, num_bytes: int, seconds: float) -> None:
    entry[0] += 1
    entry[1] += blocks
    entry[2] += num_bytes
    entry[3] += seconds


def collector_for(registry: Registry) -> TransferCollector:
    """The collector registered on ``registry``, registering one on first use."""
    plugin = registry.pm.get_plugin(PLUGIN_NAME)
    if plugin is None:
        plugin = TransferCollector()
        registry.register(plugin, PLUGIN_NAME)
    return plugin
