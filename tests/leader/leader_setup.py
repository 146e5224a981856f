"""Settings and layouts for the leader tests (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

import numpy as np

from kvbm_core.layout import BlockLayout
from kvbm_core.ops import Op, OpResult
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


class Stager:
    """Stands in for the workers of ``world_size`` ranks when the leader stages disk blocks: each
    rank succeeds, except for the blocks named in ``bad`` (positions within an op, by rank)."""

    def __init__(self, world_size: int = 1) -> None:
        self.world_size = world_size
        self.bad: dict[int, tuple[int, ...]] = {}
        self.reachable = True
        self.ops: list[Op] = []

    def ready(self) -> bool:
        return self.reachable

    def run(self, op: Op, timeout: float) -> list[OpResult]:
        self.ops.append(op)
        out = []
        for rank in range(self.world_size):
            bad = tuple(b for b in self.bad.get(rank, ()) if b < op.num_blocks)
            out.append(OpResult(op.op_id, not bad, rank=rank, num_bytes=100 * (op.num_blocks - len(bad)),
                                seconds=1e-3, error="checksum mismatch" if bad else "", failed_blocks=bad))
        return out
