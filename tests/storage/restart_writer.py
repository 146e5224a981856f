"""A separate process that writes disk-tier blocks, for the restart tests (run as a script).

``restart_writer.py DIR SLOTS COUNT``: writes blocks with keys ``(i, i + 1)`` into slots ``i`` for
``i < COUNT`` through the transfer engine (device -> disk) and exits. With COUNT = 0 it writes
forever (random slots and keys), printing each finished write, until it is killed.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from kvbm_core.interfaces import TierLevel
from kvbm_core.ops import Route, StepOps
from kvbm_core.worker import TransferEngine
from kvbm_tier_disk import LocalDiskTier

from tierkit import LAYOUT, make_context


def content(keys: np.ndarray, nbytes: int) -> torch.Tensor:
    """The bytes a block with these keys holds: a pure function of its key."""
    rows = [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(int(k[0])))
            for k in keys]
    return torch.stack(rows)


def main(directory: str, slots: int, count: int) -> None:
    tier = LocalDiskTier(make_context("disk", slots, directory, options={"io_mb": 1, "io_threads": 2}))
    bpb = LAYOUT.bytes_per_block
    if count:
        keys = np.stack([np.arange(count), np.arange(count) + 1], axis=1).astype(np.uint64)
        pool = content(keys, bpb)
        engine = TransferEngine(pool, LAYOUT, {TierLevel.DISK: tier}, rank=0)
        step = StepOps.build(0, [(1, Route.D2DISK, 0, np.arange(count), np.arange(count), keys)])
        engine.start_stores(step.select({Route.D2DISK}), None)
        results = engine.drain(30)
        assert [r.ok for r in results] == [True], results
        engine.close()
        tier.close()
        return
    rng = np.random.default_rng()
    lane = tier.lanes.lane(tier.lanes.acquire(1.0))
    while True:
        slot = int(rng.integers(0, slots))
        key = np.array([[rng.integers(1, 2**62), 7]], dtype=np.uint64)
        tier.write_rows(content(key, bpb), slot, key, lane)
        print(slot, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
