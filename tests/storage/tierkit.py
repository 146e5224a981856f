"""Tier contexts for tests: a small layout, one with padding, and a context builder on a real directory
(``directory=None``: none configured, so the tier uses its private per-user default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kvbm_core.interfaces import StorageTier, TierContext, TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.ops import Op, OpResult, Route
from kvbm_core.settings.model import DiskSettings, KvbmSettings, TierSpec

NAMESPACE = bytes(range(16))
LAYOUT = BlockLayout(num_layers=2, kv_factor=2, elems_per_block=1024, dtype="bfloat16", tokens_per_block=16)
# 2 x 2 x 1000 x 2 = 8000 bytes: not a multiple of 4096, so records carry padding and writes bounce.
ODD_LAYOUT = BlockLayout(num_layers=2, kv_factor=2, elems_per_block=1000, dtype="bfloat16", tokens_per_block=16)


def make_context(kind: str, num_slots: int, directory: str | Path | None = None, *, layout: BlockLayout = LAYOUT,
                 namespace: bytes = NAMESPACE, rank: int = 0, world_size: int = 1,
                 capacity_gb: float | None = None, zerofill: bool = False, disable_o_direct: bool = False,
                 options: dict | None = None) -> TierContext:
    spec = TierSpec(kind=kind, capacity_gb=capacity_gb, num_blocks=None if capacity_gb else num_slots,
                    options=options if options is not None else ({"io_mb": 1, "io_threads": 2} if kind != "cpu" else {}))
    disk = DiskSettings(zerofill_fallback=zerofill, disable_o_direct=disable_o_direct)
    # None: no directory configured (the tier picks its private default), whatever the model's default.
    disk = disk.model_copy(update={"directory": None if directory is None else str(directory)})
    settings = KvbmSettings(disk=disk)
    return TierContext(spec=spec, layout=layout, num_slots=num_slots, rank=rank, world_size=world_size,
                       namespace=namespace, device=None, settings=settings)


def stage(disk: StorageTier, slots: np.ndarray, keys: np.ndarray, *, layout: BlockLayout = LAYOUT
          ) -> tuple[OpResult, torch.Tensor]:
    """Read disk ``slots`` into a fresh host tier as the leader stages them (verified), through the
    transfer engine; returns the result and the host rows ``0..n``."""
    from kvbm_core.worker import TransferEngine
    from kvbm_tier_cpu import PinnedHostTier

    slots = np.asarray(slots, np.int64)
    host = PinnedHostTier(make_context("cpu", len(slots), layout=layout))
    pool = torch.zeros(1, layout.bytes_per_block, dtype=torch.uint8)
    engine = TransferEngine(pool, layout, {TierLevel.HOST: host, TierLevel.DISK: disk}, rank=0)
    try:
        result = engine.run_now(Op(1, Route.DISK2H, 0, slots, np.arange(len(slots)), np.asarray(keys)), timeout=30)
        return result, host.slots.clone()
    finally:
        engine.close()
        host.close()
