"""Eviction policies: the EvictionPolicy contract for every installed policy, and ``scan_resistant``
(plugins/policy_frequency): its exact order against a naive model of its documented rules, scan
resistance and adaptation through a real TierState, its options, and the leader's invariants with it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbm_core.builtin import PriorityLruEviction
from kvbm_core.errors import ConfigError
from kvbm_core.interfaces import EvictionPolicy, TierLevel
from kvbm_core.leader import BlockManager
from kvbm_core.leader.tier_state import TierState
from kvbm_core.settings import resolve_settings
from kvbm_policy_frequency.eviction import _QUANTILE, _RATE, DEFAULTS, ScanResistantEviction

from .leader_setup import layout
from .leader_setup import settings as make_settings
from .leader_sim import Sim, SimRequest
from .test_leader_properties import scenarios

HONOUR_PRIORITIES = ("lru", "scan_resistant")

# ------------------------------------------------------------------------------------ contract
SLOTS = 10
operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, SLOTS - 1), st.sampled_from([20, 35, 35, 35, 60])),
        st.tuples(st.just("discard"), st.integers(0, SLOTS - 1)),
        st.tuples(st.just("victim")),
    ),
    max_size=300,
)


def installed(registry) -> list[str]:
    return sorted(registry.types("eviction"))


def test_scan_resistant_is_installed_under_its_name(registry):
    assert registry.get("eviction", "scan_resistant", "eviction") is ScanResistantEviction
    assert set(HONOUR_PRIORITIES) <= set(installed(registry))


@settings(max_examples=150, deadline=None)
@given(ops=operations, data=st.data())
def test_every_policy_keeps_the_contract(registry, ops, data):
    """Against a set: ``victim`` returns only a slot added and neither discarded nor returned since
    (a lowest-priority one, for policies that honour priorities), None only when there is none;
    ``len`` counts them; discarding an unknown slot is harmless."""
    name = data.draw(st.sampled_from(installed(registry)))
    policy: EvictionPolicy = registry.get("eviction", name, "eviction")(SLOTS)
    evictable: dict[int, int] = {}  # slot -> priority
    for tick, op in enumerate(ops, 1):
        if op[0] == "add":
            policy.add(op[1], op[2], tick)
            evictable[op[1]] = op[2]
        elif op[0] == "discard":
            policy.discard(op[1])
            evictable.pop(op[1], None)
        else:
            slot = policy.victim()
            if not evictable:
                assert slot is None
                continue
            assert slot in evictable, (name, slot, evictable)
            if name in HONOUR_PRIORITIES:
                assert evictable[slot] == min(evictable.values()), (name, slot, evictable)
            del evictable[slot]
        assert len(policy) == len(evictable)


class NaiveScanResistant:
    """The module docstring's rules, written the slow way: every victim scans every entry."""

    def __init__(self, num_slots: int, levels: int, horizon_factor: float, initial_horizon: float) -> None:
        self.n, self.levels, self.k = num_slots, levels, horizon_factor
        self.reuse_idle = initial_horizon * num_slots / horizon_factor
        self.clock = 0
        self.entries: dict[int, tuple[int, int, int]] = {}  # slot -> (priority, level, clock of last add)
        self.history: dict[int, tuple[int, int]] = {}  # slot -> (clock of last add, level)

    def add(self, slot: int, priority: int) -> None:
        self.clock += 1
        level = 0
        if slot in self.history:
            last, past_level = self.history[slot]
            step = _RATE / self.n
            if self.clock - last > self.reuse_idle:
                self.reuse_idle *= 1 + step * _QUANTILE
            else:
                self.reuse_idle = max(1.0, self.reuse_idle * (1 - step * (1 - _QUANTILE)))
            level = min(past_level + 1, self.levels)
        self.entries[slot] = (priority, level, self.clock)
        self.history[slot] = (self.clock, level)

    def discard(self, slot: int) -> None:
        self.entries.pop(slot, None)
        self.history.pop(slot, None)

    def victim(self) -> int | None:
        if not self.entries:
            return None
        lowest = min(p for p, _, _ in self.entries.values())
        mine = {s: e for s, e in self.entries.items() if e[0] == lowest}
        horizon = max(self.n, self.k * self.reuse_idle)
        stalest = min(mine, key=lambda s: mine[s][2])
        probation = [s for s, e in mine.items() if e[1] == 0]
        if mine[stalest][2] < self.clock - horizon:
            slot = stalest
        elif probation:
            slot = max(probation, key=lambda s: mine[s][2])
        else:
            slot = min(mine, key=lambda s: (mine[s][1], mine[s][2]))
        del self.entries[slot]
        return slot


@settings(max_examples=200, deadline=None)
@given(
    ops=operations,
    levels=st.integers(1, 4),
    horizon_factor=st.sampled_from([1, 1.5, 2.0]),
    initial_horizon=st.sampled_from([1, 2.5, 4.0]),
)
def test_scan_resistant_evicts_exactly_as_its_rules_say(ops, levels, horizon_factor, initial_horizon):
    options = {"levels": levels, "horizon_factor": horizon_factor, "initial_horizon": initial_horizon}
    policy = ScanResistantEviction(SLOTS, options)
    model = NaiveScanResistant(SLOTS, levels, horizon_factor, initial_horizon)
    for tick, op in enumerate(ops, 1):
        if op[0] == "add":
            policy.add(op[1], op[2], tick)
            model.add(op[1], op[2])
        elif op[0] == "discard":
            policy.discard(op[1])
            model.discard(op[1])
        else:
            assert policy.victim() == model.victim()
        assert len(policy) == len(model.entries)
        assert policy.horizon == max(SLOTS, horizon_factor * model.reuse_idle)


# ------------------------------------------------------------------------- through a TierState
def key(i: int) -> np.ndarray:
    return np.array([[i * 0x9E3779B97F4A7C15 % 2**64, i + 1]], np.uint64)


def use_or_store(tier: TierState, i: int) -> bool:
    """What the block manager does for one block: a hit is held and released, a miss is stored."""
    k = key(i)
    slot = tier.lookup(k)
    if tier.matchable(slot)[0]:
        tier.hold(slot)
        tier.release(slot)
        return True
    slots, _, _ = tier.allocate(1)
    tier.begin_write(slots, k, np.zeros(1, np.uint64), np.full(1, 35))
    tier.complete_write(slots)
    return False


def passes(policy: EvictionPolicy, num_slots: int, ids: range, rounds: int, tier: TierState | None = None) -> list[int]:
    """Hits per pass over ``ids``, in order, ``rounds`` times."""
    if tier is None:
        tier = TierState("cpu", TierLevel.HOST, num_slots, policy)
    hits = [sum(use_or_store(tier, i) for i in ids) for _ in range(rounds)]
    tier.verify()
    return hits


def test_a_loop_larger_than_the_tier_is_partly_served():
    """60 slots, 90 blocks used in turn: LRU evicts each block just before it is used again."""
    assert passes(PriorityLruEviction(60), 60, range(90), 6) == [0] * 6
    hits = passes(ScanResistantEviction(60), 60, range(90), 6)
    assert hits[0] == 0
    assert min(hits[1:]) >= 54, hits


def test_a_one_off_scan_does_not_flush_blocks_in_use():
    def hot_left_after_scan(policy: EvictionPolicy) -> int:
        tier = TierState("cpu", TierLevel.HOST, 50, policy)
        passes(policy, 50, range(20), 3, tier)  # 20 blocks used three times
        passes(policy, 50, range(1000, 1060), 1, tier)  # then 60 new blocks, once: 30 more than fit
        return int(tier.matchable(tier.lookup(np.concatenate([key(i) for i in range(20)]))).sum())

    assert hot_left_after_scan(PriorityLruEviction(50)) == 0
    assert hot_left_after_scan(ScanResistantEviction(50)) == 20


def test_a_working_set_that_moves_on_is_followed():
    """Blocks idle much longer than blocks are reused after are let go: a new working set gets in."""

    def new_set_hits(policy: EvictionPolicy) -> list[int]:
        tier = TierState("cpu", TierLevel.HOST, 60, policy)
        passes(policy, 60, range(60), 5, tier)  # the old set fits, used five times
        return passes(policy, 60, range(1000, 1060), 6, tier)  # the new one alone from now on

    assert new_set_hits(PriorityLruEviction(60))[1:] == [60] * 5
    followed = new_set_hits(ScanResistantEviction(60))
    assert followed[-1] == 60, followed
    never_aging = new_set_hits(ScanResistantEviction(60, {"horizon_factor": 1e9, "initial_horizon": 1e9}))
    assert max(never_aging) <= 1, never_aging  # without the horizon the old set would stay for good


def test_lower_priority_goes_first_even_when_used_more():
    tier = TierState("cpu", TierLevel.HOST, 2, ScanResistantEviction(2))
    for i, priority in ((1, 20), (2, 60)):
        slots, _, _ = tier.allocate(1)
        tier.begin_write(slots, key(i), np.zeros(1, np.uint64), np.full(1, priority))
        tier.complete_write(slots)
    low = tier.lookup(key(1))
    for _ in range(3):  # the low-priority block is the one used
        tier.hold(low)
        tier.release(low)
    slots, evicted, _ = tier.allocate(1)
    assert slots.tolist() == low.tolist() and evicted.tolist() == key(1).tolist()


def test_a_held_victim_keeps_its_frequency():
    """Offered while held, a slot is skipped by the tier and added back on release, as a use."""
    tier = TierState("cpu", TierLevel.HOST, 3, ScanResistantEviction(3))
    for i in range(1, 4):
        use_or_store(tier, i)
    used = tier.lookup(key(1))
    tier.hold(used)
    tier.release(used)  # block 1: level 1
    tier.hold(used)  # held while the tier looks for room: offered after both probationary blocks
    slots, evicted, _ = tier.allocate(3)
    assert evicted.tolist() == np.concatenate([key(3), key(2)]).tolist()
    assert len(slots) == 2
    tier.begin_write(slots, np.concatenate([key(5), key(6)]), np.zeros(2, np.uint64), np.full(2, 35))
    tier.complete_write(slots)
    tier.release(used)  # added back: its second use, level 2
    assert use_or_store(tier, 5)  # block 5: level 1
    slots, evicted, _ = tier.allocate(2)  # probationary block 6, then the lowest level: block 5
    assert evicted.tolist() == np.concatenate([key(6), key(5)]).tolist()
    tier.begin_write(slots, np.concatenate([key(7), key(8)]), np.zeros(2, np.uint64), np.full(2, 35))
    tier.verify()


# ----------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("options", "where"),
    [
        ({"levels": 0}, "levels"),
        ({"levels": 9}, "levels"),
        ({"levels": 2.5}, "levels"),
        ({"levels": True}, "levels"),
        ({"horizon_factor": 0.5}, "horizon_factor"),
        ({"horizon_factor": math.inf}, "horizon_factor"),
        ({"horizon_factor": math.nan}, "horizon_factor"),
        ({"horizon_factor": "2"}, "horizon_factor"),
        ({"initial_horizon": 0}, "initial_horizon"),
        ({"window": 0.1}, "window"),
    ],
)
def test_bad_options_name_the_yaml_key(make_bm, options, where):
    with pytest.raises(ConfigError, match=rf"^eviction_options\.{where}: ") as caught:
        ScanResistantEviction(8, options)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=rf"^eviction_options\.{where}: "):
        ScanResistantEviction.validate_options(options)
    with pytest.raises(ConfigError, match=rf"^eviction_options\.{where}: "):
        make_bm(make_settings(16, eviction="scan_resistant", eviction_options=options))


def test_a_profile_with_a_bad_option_is_refused_when_resolving(registry, tmp_path):
    """``kvbm config show``, ``kvbm doctor`` and the engine refuse it before any tier is built."""
    profile = tmp_path / "scan.yaml"
    profile.write_text(yaml.safe_dump({"tiers": [{"kind": "cpu", "capacity_gb": 0.01}], "eviction": "scan_resistant",
                                       "eviction_options": {"horizon_factor": 0.5}}))
    with pytest.raises(ConfigError, match=r"^profile .*scan\.yaml: eviction_options\.horizon_factor: got 0\.5 "):
        resolve_settings({"DYN_KVBM_PROFILE": str(profile)}, registry=registry)
    profile.write_text(yaml.safe_dump({"tiers": [{"kind": "cpu", "capacity_gb": 0.01}], "eviction": "scan_resistant",
                                       "eviction_options": {"levels": 2}}))
    settings = resolve_settings({"DYN_KVBM_PROFILE": str(profile)}, registry=registry).settings
    assert (settings.eviction, settings.eviction_options) == ("scan_resistant", {"levels": 2})


def test_selected_by_name_with_its_options_for_every_tier(make_bm):
    bm = make_bm(make_settings(16, 32, eviction="scan_resistant", eviction_options={"levels": 2}))
    for tier in (bm.host, bm.disk):
        assert isinstance(tier.policy, ScanResistantEviction)
        assert tier.policy.levels == 2 and tier.policy.num_slots == tier.num_slots
    assert ScanResistantEviction(4).levels == DEFAULTS["levels"]


# ------------------------------------------------------------------------------ in the leader
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sc=scenarios())
def test_the_leader_keeps_every_invariant_with_it(registry, sc):
    """leader_sim's random streams (tiny tiers, failures, late results) with ``scan_resistant``."""
    s = make_settings(sc["host"], sc["disk"], disk_filter=sc["disk_filter"], min_priority=sc["min_priority"],
                      eviction="scan_resistant")
    bm = BlockManager(s, layout(sc["tpb"]), world_size=1, model_id="prop", registry=registry)
    sim = Sim(bm, device_blocks=96, chunk=sc["chunk"], overlap=sc["overlap"], seed=sc["seed"],
              fail_rate=sc["fail_rate"], deliver_rate=sc["deliver_rate"], partial_reuse_rate=sc["partial_reuse_rate"],
              device_reuse=sc["device_reuse"])
    for r in sc["requests"]:
        sim.add(SimRequest(**r))
    sim.run()
    assert all(isinstance(t.policy, ScanResistantEviction) for t in (bm.host, bm.disk) if t is not None)
