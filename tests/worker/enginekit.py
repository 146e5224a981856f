"""Engines for tests: a CPU KV pool and real tiers built through the registry, as a worker builds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvbm_core.interfaces import StorageTier, TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.ops import BACKGROUND, LOADS, STAGING, STORES, Op, OpResult, Route, StepOps, TierAllocation, WorkerConfig
from kvbm_core.registry import default_registry
from kvbm_core.settings.model import DiskSettings, KvbmSettings, TierSpec
from kvbm_core.worker import TransferEngine, build_tiers

LAYOUT = BlockLayout(num_layers=2, kv_factor=2, elems_per_block=1024, dtype="bfloat16", tokens_per_block=16)
BPB = LAYOUT.bytes_per_block


@dataclass
class Rig:
    engine: TransferEngine
    pool: torch.Tensor  # the engine's pool as [blocks, bytes_per_block] uint8
    tiers: dict[TierLevel, StorageTier]
    staged: list[OpResult] = field(default_factory=list)  # results of staging ops run by run()

    def close(self) -> None:
        self.engine.close()
        for tier in self.tiers.values():
            tier.close()

    def run(self, step: int, ops: list[tuple]) -> dict[int, str]:
        """Submit ``(op_id, route, request_id, src, dst, keys)`` tuples through the right entry point
        (staging ops are run at once: see :meth:`stage`); returns the loads that failed."""
        packed = StepOps.build(step, ops)
        self.engine.start_stores(packed.select(STORES), None)
        self.engine.start_background(packed.select(BACKGROUND))
        for op in packed.select(STAGING):
            self.staged.append(self.engine.run_now(op, timeout=30.0))
        return self.engine.start_loads(packed.select(LOADS), None)

    def stage(self, op_id: int, src, dst, keys) -> OpResult:
        """Stage disk slots ``src`` into host slots ``dst`` now, as the leader asks every rank to."""
        op = Op(op_id, Route.DISK2H, -1, np.asarray(src, np.int64), np.asarray(dst, np.int64), np.asarray(keys))
        return self.engine.run_now(op, timeout=30.0)


def make_rig(directory: Path, *, host_slots: int = 32, disk_slots: int = 32, device_blocks: int = 64,
             kinds: tuple[str, ...] = ("cpu", "disk"), io_threads: int = 4) -> Rig:
    specs, allocations = [], []
    if "cpu" in kinds:
        specs.append(TierSpec(kind="cpu", num_blocks=host_slots))
        allocations.append(TierAllocation("cpu", TierLevel.HOST, host_slots))
    for kind in ("disk", "gds"):
        if kind in kinds:
            specs.append(TierSpec(kind=kind, num_blocks=disk_slots, options={"io_mb": 1, "io_threads": io_threads,
                                                                            "lanes": 2 * io_threads}))
            allocations.append(TierAllocation(kind, TierLevel.DISK, disk_slots))
    settings = KvbmSettings(tiers=specs, disk=DiskSettings(directory=str(directory)))
    config = WorkerConfig(settings=settings, tiers=tuple(allocations), namespace=b"\x42" * 16, world_size=1)
    tiers = build_tiers(config, LAYOUT, 0, None, default_registry())
    pool = torch.zeros(device_blocks, LAYOUT.num_layers, LAYOUT.kv_factor, LAYOUT.elems_per_block, dtype=torch.bfloat16)
    engine = TransferEngine(pool, LAYOUT, tiers, rank=0)
    return Rig(engine, pool.view(device_blocks, -1).view(torch.uint8), tiers)


def keys_for(ids: np.ndarray) -> np.ndarray:
    """A 128-bit key per content id."""
    ids = np.asarray(ids, dtype=np.uint64)
    return np.stack([ids, ids ^ np.uint64(0xABCDEF)], axis=1)


def random_rows(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, BPB), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


__all__ = ["BPB", "LAYOUT", "Rig", "Route", "keys_for", "make_rig", "random_rows"]
