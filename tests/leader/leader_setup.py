"""Settings and layouts for the leader tests (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

from kvbm_core.layout import BlockLayout
from kvbm_core.settings.model import KvbmSettings


def layout(tokens_per_block: int = 4) -> BlockLayout:
    return BlockLayout(num_layers=2, kv_factor=2, elems_per_block=8 * tokens_per_block, dtype="float16",
                       tokens_per_block=tokens_per_block)


def settings(host: int | None = 16, disk: int | None = None, *, disk_filter: bool = True, cost: bool = False,
             min_priority: int = 0, **extra) -> KvbmSettings:
    """A pipeline of a ``cpu`` tier of ``host`` slots and/or a ``disk`` tier of ``disk`` slots."""
    tiers = []
    if host is not None:
        tiers.append({"kind": "cpu", "num_blocks": host})
    if disk is not None:
        tiers.append({"kind": "disk", "num_blocks": disk})
    data = {
        "tiers": tiers,
        "disk_offload_filter": {"enabled": disk_filter},
        "cost_model": {"enabled": cost},
        "host_offload_prefix_min_priority": min_priority,
        **extra,
    }
    return KvbmSettings.model_validate(data)
