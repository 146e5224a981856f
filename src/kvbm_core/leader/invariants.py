"""The block manager's cross-structure invariants, checked by the tests after every step.

- every hold on a slot is accounted for by an unreported load, host -> disk read or staging read,
  a block queued for the disk, or a promise not yet turned into loads (so no pinned or in-flight slot can be evicted or
  reallocated);
- every ``WRITING`` slot is the target of exactly one store, host -> disk copy or staging whose
  result is pending or waiting on its request's loads (no slot is double-booked);
- each tier's own structures agree (:meth:`TierState.verify`);
- a request's pending operations are known, and a promise not yet loaded still points at slots
  holding the promised keys.

Raises AssertionError; costs O(slots), so it is for tests, not for serving.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvbm_core.leader.slot_state import SlotState
from kvbm_core.ops import LOADS, STAGING, STORES, Route

if TYPE_CHECKING:
    from kvbm_core.leader.manager import BlockManager


def check_invariants(bm: "BlockManager") -> None:
    tiers = [t for t in (bm.host, bm.disk) if t is not None]
    holds = {id(t): np.zeros(t.num_slots, np.int64) for t in tiers}
    writes = {id(t): np.zeros(t.num_slots, np.int64) for t in tiers}
    deferred = [op for req in bm._requests.values() for op, _ in req.deferred]
    for op in [*bm._ops.values(), *deferred]:
        if op.route in STORES:
            np.add.at(writes[id(op.tier)], op.dst, 1)
        elif op.route in LOADS:
            np.add.at(holds[id(op.tier)], op.src, 1)
        elif op.route in STAGING:
            np.add.at(holds[id(bm.disk)], op.src, 1)
            np.add.at(writes[id(bm.host)], op.dst, 1)
        else:
            np.add.at(holds[id(bm.host)], op.src, 1)
            np.add.at(writes[id(bm.disk)], op.dst, 1)
    deferred_ids = {op.op_id for op in deferred}
    for req in bm._requests.values():
        if req.num_promised and not req.loads_emitted:
            keys = req.hasher.keys(req.promise_end_block, req.device_blocks)  # type: ignore[union-attr]
            host, slots = bm.host, req.promised_slots  # a promise only ever covers host blocks
            np.add.at(holds[id(host)], slots, 1)
            assert (host.keys[slots] == keys).all(), (req.request_id, "a promised slot changed")
            assert np.isin(host.state[slots], (SlotState.HELD, SlotState.DOOMED)).all(), req.request_id
        assert req.pending <= req.ops, req.request_id
        assert all(i in bm._ops or i in deferred_ids for i in req.pending), req.request_id
        assert req.pending_loads <= req.pending, req.request_id
    if bm._to_disk is not None:  # blocks queued for the disk are held in the host until they get there
        np.add.at(holds[id(bm.host)], bm._to_disk.queued_slots(), 1)
        in_flight = sum(len(op.src) for op in bm._ops.values() if op.route == Route.H2DISK)
        assert bm._to_disk.in_flight == in_flight, (bm._to_disk.in_flight, in_flight)
    for t in tiers:
        t.verify()
        assert np.array_equal(holds[id(t)], t.holds), (t.kind, np.flatnonzero(holds[id(t)] != t.holds)[:5])
        assert (writes[id(t)] <= 1).all(), (t.kind, "two writes in flight to one slot")
        assert np.array_equal(writes[id(t)] == 1, t.state == SlotState.WRITING), t.kind
