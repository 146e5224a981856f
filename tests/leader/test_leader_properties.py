"""Property tests: random request streams through the model engine and workers (leader_sim).

Each example draws a pipeline (host only, host + disk with or without the filter, disk only), tiny
tiers (eviction pressure), shared-prefix request families, chunk sizes, the overlap scheduler,
cancellations at any point, results arriving late and out of order, and injected failures. After
every step the manager's invariants are checked (``BlockManager.verify``: holds and writes
accounted for by operations and promises, no two writes to one slot, index consistent), every
load checks that it reads exactly the KV its destination block needs, StepOps survive pickling,
and at the end every operation has reached its end and every request is forgotten.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbm_core.leader import BlockManager
from kvbm_core.ops import LOADS, Route

from .leader_setup import layout
from .leader_setup import settings as make_settings
from .leader_sim import Sim, SimRequest

PROFILES = {
    "cpu": dict(host=True, disk=False, disk_filter=True),
    "cpu_disk": dict(host=True, disk=True, disk_filter=True),
    "cpu_disk_nofilter": dict(host=True, disk=True, disk_filter=False),
    "disk": dict(host=False, disk=True, disk_filter=True),
}


@st.composite
def scenarios(draw):
    profile = PROFILES[draw(st.sampled_from(sorted(PROFILES)))]
    tpb = draw(st.sampled_from([2, 4]))
    families = draw(st.lists(st.lists(st.integers(0, 40), min_size=3, max_size=36), min_size=1, max_size=3))
    requests = []
    for rid in range(draw(st.integers(1, 14))):
        base = families[draw(st.integers(0, len(families) - 1))]
        prefix = draw(st.integers(1, len(base)))
        tail = draw(st.lists(st.integers(0, 40), max_size=6))
        requests.append(dict(
            rid=rid,
            prompt=base[:prefix] + tail,
            gen=draw(st.integers(0, 9)),
            arrive=draw(st.integers(0, 10)),
            cancel_after=draw(st.none() | st.integers(0, 4)),
            salt=draw(st.sampled_from([None, None, "tenant"])),
            priority=draw(st.sampled_from([None, None, 30, 60])),
        ))
    return dict(
        tpb=tpb,
        host=draw(st.integers(1, 20)) if profile["host"] else None,
        disk=draw(st.integers(1, 40)) if profile["disk"] else None,
        disk_filter=profile["disk_filter"],
        min_priority=draw(st.sampled_from([0, 0, 0, 40])),
        chunk=draw(st.sampled_from([1, 3, 4, 1000])),
        overlap=draw(st.booleans()),
        fail_rate=draw(st.sampled_from([0.0, 0.0, 0.05, 0.25])),
        deliver_rate=draw(st.sampled_from([0.15, 0.6, 1.0])),
        partial_reuse_rate=draw(st.sampled_from([0.0, 0.3])),
        device_reuse=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        requests=requests,
    )


def build(registry, sc, device_blocks: int = 96) -> Sim:
    s = make_settings(sc["host"], sc["disk"], disk_filter=sc["disk_filter"], min_priority=sc["min_priority"])
    stager = _LateStager()
    bm = BlockManager(s, layout(sc["tpb"]), world_size=1, model_id="prop", registry=registry, stager=stager)
    sim = Sim(bm, device_blocks=device_blocks, chunk=sc["chunk"], overlap=sc["overlap"], seed=sc["seed"],
              fail_rate=sc["fail_rate"], deliver_rate=sc["deliver_rate"], partial_reuse_rate=sc["partial_reuse_rate"],
              device_reuse=sc.get("device_reuse", True))
    stager.sim = sim
    for r in sc["requests"]:
        sim.add(SimRequest(**r))
    return sim


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sc=scenarios())
def test_random_streams_keep_every_invariant(registry, sc):
    sim = build(registry, sc)
    sim.run()
    bm = sim.bm
    assert bm.stats.onboard_blocks_h2d <= sim.loads_checked
    if sc["fail_rate"] == 0:
        assert not bm.failed_requests and bm.stats.failed_ops == 0


def test_streams_reuse_across_requests(registry):
    """A fixed busy stream: prefixes really are served from the tiers (the properties are not vacuous)."""
    for profile in ("cpu", "cpu_disk", "disk"):
        p = PROFILES[profile]
        sc = dict(tpb=4, host=8 if p["host"] else None, disk=24 if p["disk"] else None, disk_filter=True,
                  min_priority=0, chunk=8, overlap=True, fail_rate=0.0, deliver_rate=0.6, partial_reuse_rate=0.0,
                  seed=7, requests=[], device_reuse=False)
        base = [(i * 37) % 41 for i in range(40)]
        sc["requests"] = [dict(rid=i, prompt=base[: 13 + (i % 5) * 5], gen=i % 4, arrive=i * 2) for i in range(16)]
        sim = build(registry, sc)  # no device reuse: every prefix comes back from the tiers
        sim.run()
        assert sim.loads_checked > 10, profile
        assert sim.loads_from["host"] > 0, profile
        if profile == "cpu_disk":  # 8 host slots: the prefixes come back from the disk, staged
            assert sim.bm.stats.staged_blocks_disk2h > 0, profile
        if profile == "disk":  # its staging tier is as big as the disk: everything stays there too
            assert sim.bm.stats.offload_blocks_h2disk > 0, profile


class _LateStager:
    """The simulation is the stager, but it is built after the manager it drives."""

    sim: Sim

    def ready(self) -> bool:
        return self.sim.ready()

    def run(self, op, timeout):
        return self.sim.stage(op, timeout)


class _PairsBackwards(BlockManager):
    """A deliberately broken manager: loads land in the promised device blocks in reverse order."""

    def _emit_onboards(self, planned):
        super()._emit_onboards(planned)
        for op in planned:
            if op.route in LOADS:
                op.dst = op.dst[::-1].copy()


class _NoStoreGating(BlockManager):
    """A deliberately broken manager: store results are applied without waiting for the loads
    (and here they arrive before the load results)."""

    def apply_results(self, results):
        for req in self._requests.values():
            req.pending_loads.clear()
        ops = self._ops
        super().apply_results(sorted(results, key=lambda r: r.op_id in ops and ops[r.op_id].route in LOADS))


@pytest.mark.parametrize(
    ("manager", "fail_loads", "caught"),
    [(_PairsBackwards, False, True), (_NoStoreGating, True, True), (BlockManager, False, False),
     (BlockManager, True, False)],
)
def test_the_harness_catches_wrong_kv(registry, manager, fail_loads, caught):
    """The model worker's checks are not vacuous: two classic bugs are caught; the real manager passes."""
    base = list(range(100, 140))
    s = make_settings(32)
    bm = manager(s, layout(4), world_size=1, model_id="prop", registry=registry)
    fail_first = {"done": False}

    def fail_if(op):
        if fail_loads and op.route == Route.H2D and not fail_first["done"]:
            fail_first["done"] = True
            return True
        return False

    sim = Sim(bm, device_blocks=64, chunk=1000, overlap=False, seed=1, deliver_rate=1.0, fail_if=fail_if,
              device_reuse=False)
    sim.add(SimRequest(0, base[:13], gen=0, arrive=0))
    sim.add(SimRequest(1, base[:29], gen=0, arrive=2))  # loads 3 blocks, computes 4 more
    sim.add(SimRequest(3, base[:13], gen=0, arrive=3))  # stores the first 3 again if a failure dropped them
    sim.add(SimRequest(2, base[:37], gen=0, arrive=6))  # loads what 1 computed
    if caught:
        with pytest.raises(AssertionError, match="wrong KV"):
            sim.run()
    else:
        sim.run()
        assert sim.loads_checked >= 3
