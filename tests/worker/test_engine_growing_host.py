"""The transfer engine on a host tier that is still growing: slots beyond its usable prefix are
refused (the operation fails, no byte moves), slots below it serve, and grown slots serve too."""

from __future__ import annotations

import numpy as np
import torch

from kvbm_core.interfaces import TierContext, TierLevel
from kvbm_core.ops import Route
from kvbm_core.settings.model import TierSpec
from kvbm_core.worker import TransferEngine
from kvbm_tier_cpu import PinnedHostTier

from enginekit import BPB, LAYOUT, Rig, keys_for, random_rows

MIB = 1 << 20


def growing_rig(num_slots: int = 8, start_slots: int = 2, device_blocks: int = 16) -> Rig:
    """A CPU pool and a cpu tier of one-slot segments whose first ``start_slots`` are usable, paused."""
    spec = TierSpec(kind="cpu", num_blocks=num_slots, options={"segment_mb": BPB / MIB,
                                                              "start_mb": start_slots * BPB / MIB})
    context = TierContext(spec=spec, layout=LAYOUT, num_slots=num_slots, rank=0, world_size=1,
                          namespace=b"\x42" * 16)
    host = PinnedHostTier(context, paused=True)
    pool = torch.zeros(device_blocks, LAYOUT.num_layers, LAYOUT.kv_factor, LAYOUT.elems_per_block, dtype=torch.bfloat16)
    engine = TransferEngine(pool, LAYOUT, {TierLevel.HOST: host}, rank=0)
    return Rig(engine, pool.view(device_blocks, -1).view(torch.uint8), {TierLevel.HOST: host})


def test_slots_beyond_the_usable_prefix_are_refused_without_touching_memory() -> None:
    rig = growing_rig()
    host = rig.tiers[TierLevel.HOST]
    assert host.ready_slots == 2
    rig.pool[:4] = random_rows(4, seed=11)
    original = rig.pool.clone()
    keys = keys_for(np.arange(4))
    rig.run(0, [(1, Route.D2H, 1, np.array([0, 1]), np.array([0, 1]), keys[:2])])
    assert rig.engine.drain(10)[0].ok
    rig.run(1, [(2, Route.D2H, 2, np.array([2, 3]), np.array([1, 2]), keys[2:])])  # slot 2 is not usable yet
    (refused,) = rig.engine.drain(10)
    assert not refused.ok and refused.failed_blocks == (0, 1)
    assert "host slot 2 is not usable yet" in refused.error and "2 of 8 slots ready" in refused.error
    assert torch.equal(host.slots[:2], original[:2])  # not even the usable slot 1 was written
    assert int(host.slots[2].sum()) == 0

    failed = rig.run(2, [(3, Route.H2D, 3, np.array([1, 5]), np.array([8, 9]), keys[:2])])
    assert list(failed) == [3] and "not usable yet" in failed[3]
    assert int(rig.pool[8:10].sum()) == 0  # a refused load copies nothing
    rig.engine.drain(10)

    host.resume_growth()
    assert host.wait_ready(8, timeout=60) == 8
    rig.run(3, [(4, Route.D2H, 4, np.array([2, 3]), np.array([1, 7]), keys[2:])])
    assert rig.engine.drain(10)[0].ok
    assert not rig.run(4, [(5, Route.H2D, 5, np.array([0, 1, 7]), np.array([8, 9, 10]), keys[:3])])
    assert torch.equal(rig.pool[8:11], original[[0, 2, 3]])
    rig.close()
