"""TierState: slot states, holds, eviction order, the key index."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_core.builtin import PriorityLruEviction
from kvbm_core.interfaces import TierLevel
from kvbm_core.leader.key_index import KeyIndex
from kvbm_core.leader.slot_state import ALLOWED, MATCHABLE, TRANSITIONS, SlotState
from kvbm_core.leader.tier_state import ABSENT, CLASH, SlotStateError, TierState


def tier(n: int = 4) -> TierState:
    return TierState("cpu", TierLevel.HOST, n, PriorityLruEviction(n))


def keys(*ids: int) -> np.ndarray:
    return np.array([[i * 0x9E3779B97F4A7C15 % 2**64, i + 1] for i in ids], np.uint64).reshape(-1, 2)


def store(t: TierState, ks: np.ndarray, priority: int = 35) -> np.ndarray:
    slots, _, _ = t.allocate(len(ks))
    assert len(slots) == len(ks)
    t.begin_write(slots, ks, np.arange(len(ks), dtype=np.uint64), np.full(len(ks), priority))
    t.complete_write(slots)
    return slots


def test_transition_matrix_is_the_allowed_table():
    for a in SlotState:
        for b in SlotState:
            assert TRANSITIONS[a, b] == (b in ALLOWED[a])
    assert MATCHABLE == {SlotState.READY, SlotState.HELD}


def test_a_slot_being_written_is_registered_but_not_matchable():
    t = tier()
    ks = keys(1, 2)
    slots, _, _ = t.allocate(2)
    t.begin_write(slots, ks, np.zeros(2, np.uint64), np.full(2, 35))
    found = t.lookup(ks)
    assert np.array_equal(found, slots)
    assert not t.matchable(found).any()
    t.complete_write(slots)
    assert t.matchable(t.lookup(ks)).all()
    t.verify()


def test_aborted_write_frees_and_forgets():
    t = tier()
    slots, _, _ = t.allocate(2)
    t.begin_write(slots, keys(1, 2), np.zeros(2, np.uint64), np.full(2, 35))
    t.abort_write(slots)
    assert (t.lookup(keys(1, 2)) == ABSENT).all()
    assert t.count(SlotState.FREE) == 4
    t.verify()


def test_eviction_is_lowest_priority_then_least_recently_used():
    t = tier(4)
    s_a = store(t, keys(1), priority=50)
    s_b = store(t, keys(2), priority=35)
    s_c = store(t, keys(3), priority=35)
    s_d = store(t, keys(4), priority=35)
    t.hold(s_b)
    t.release(s_b)  # b used again: now the most recent of priority 35
    slots, ev_keys, _ = t.allocate(3)
    assert slots.tolist() == [s_c[0], s_d[0], s_b[0]]
    assert ev_keys.tolist() == keys(3, 4, 2).tolist()
    assert t.lookup(keys(1)).tolist() == s_a.tolist()
    assert (t.lookup(keys(2, 3, 4)) == ABSENT).all()
    t.begin_write(slots, keys(5, 6, 7), np.zeros(3, np.uint64), np.full(3, 35))
    t.verify()


def test_held_and_writing_slots_are_never_evicted():
    t = tier(3)
    held = store(t, keys(1))
    store(t, keys(2))
    t.hold(held)
    writing, _, _ = t.allocate(1)
    t.begin_write(writing, keys(3), np.zeros(1, np.uint64), np.full(1, 35))
    slots, ev, _ = t.allocate(3)  # only the one idle READY slot can go
    assert len(slots) == 1 and ev.tolist() == keys(2).tolist()
    assert t.state[held[0]] == SlotState.HELD and t.state[writing[0]] == SlotState.WRITING
    t.begin_write(slots, keys(4), np.zeros(1, np.uint64), np.full(1, 35))
    t.verify()
    t.release(held)  # held again idle: now it can go
    slots, ev, _ = t.allocate(1)
    assert slots.tolist() == held.tolist() and ev.tolist() == keys(1).tolist()


def test_doomed_slot_leaves_the_index_and_frees_at_last_release():
    t = tier(2)
    s = store(t, keys(7))
    t.hold(s)
    t.hold(s)
    gone_keys, _ = t.invalidate(s)
    assert gone_keys.tolist() == keys(7).tolist()
    assert (t.lookup(keys(7)) == ABSENT).all()
    t.release(s)
    assert t.state[s[0]] == SlotState.DOOMED
    t.release(s)
    assert t.state[s[0]] == SlotState.FREE
    t.verify()


@pytest.mark.parametrize(
    "action",
    [
        lambda t, s: t.complete_write(s),  # FREE -> READY via complete: not a write in progress
        lambda t, s: t.hold(s),  # FREE cannot be held
        lambda t, s: t.release(s),  # nothing to release
    ],
)
def test_illegal_transitions_raise(action):
    t = tier(2)
    with pytest.raises(SlotStateError):
        action(t, np.array([0]))


def test_writing_a_key_twice_is_refused():
    t = tier(4)
    store(t, keys(1))
    slots, _, _ = t.allocate(1)
    with pytest.raises(Exception, match="already indexed"):
        t.begin_write(slots, keys(1), np.zeros(1, np.uint64), np.full(1, 35))


def test_first_lane_clash_is_neither_matched_nor_stored():
    t = tier(4)
    store(t, keys(1))
    clash = keys(1).copy()
    clash[0, 1] += 99
    assert t.lookup(clash).tolist() == [CLASH]
    assert not t.matchable(t.lookup(clash)).any()


def test_recover_registers_free_slots_only():
    t = tier(4)
    store(t, keys(1))  # takes slot 0
    taken = t.recover(np.array([0, 2, 3, 3, 9]), keys(5, 6, 7, 8, 9))
    assert taken.tolist() == [2, 3]
    assert t.matchable(t.lookup(keys(6, 7))).all()
    assert (t.lookup(keys(5, 8, 9)) == ABSENT).all()
    t.verify()
    slots, _, _ = t.allocate(1)
    assert slots.tolist() == [1]


def as_keys(lanes: list[int]) -> np.ndarray:
    """Keys whose second lane is a function of the first (the index confirms it)."""
    first = np.array(lanes, np.uint64).reshape(-1)
    return np.stack([first, first ^ np.uint64(0x5555)], axis=1)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_key_index_agrees_with_a_dict(data):
    capacity = data.draw(st.integers(1, 64))
    index = KeyIndex(capacity)
    ref: dict[int, int] = {}
    lane = st.integers(0, 2**64 - 1) | st.integers(0, 255).map(lambda x: x << 56 | 7)  # clustered homes
    for _ in range(data.draw(st.integers(1, 40))):
        if data.draw(st.booleans()) and len(ref) < capacity:
            new = data.draw(st.lists(lane, min_size=1, max_size=capacity - len(ref), unique=True))
            new = [x for x in new if x not in ref]
            slots = list(range(len(ref) * 100, len(ref) * 100 + len(new)))
            index.insert(as_keys(new), np.array(slots, np.int64))
            ref.update(zip(new, slots))
        elif ref:
            gone = data.draw(st.lists(st.sampled_from(sorted(ref)), min_size=1, unique=True))
            index.remove(as_keys(gone), np.array([ref[g] for g in gone], np.int64))
            for g in gone:
                del ref[g]
        probe = [*ref, *data.draw(st.lists(lane, max_size=5))]
        got = index.get(as_keys(probe)).tolist()
        assert got == [ref.get(p, -1) for p in probe]
        clash = as_keys(list(ref))
        clash[:, 1] += np.uint64(1)
        assert (index.get(clash) == CLASH).all()
        assert len(index) == len(ref)


# ------------------------------------------------------------------ a tier that grows after it starts
def test_a_partly_usable_tier_allocates_and_evicts_only_below_its_usable_count_until_it_grows():
    t = TierState("cpu", TierLevel.HOST, 8, PriorityLruEviction(8), usable=3)
    t.verify()
    assert t.usable == 3 and t.count(SlotState.FREE) == 8
    first = store(t, keys(1, 2, 3))
    assert sorted(first.tolist()) == [0, 1, 2]
    slots, ev_keys, _ = t.allocate(4)  # nothing free below 3: victims only, never a slot beyond
    assert sorted(slots.tolist()) == [0, 1, 2] and len(ev_keys) == 3
    t.begin_write(slots, keys(4, 5, 6), np.zeros(3, np.uint64), np.full(3, 35))
    t.verify()
    assert t.grow(6) == 3 and t.usable == 6
    t.verify()
    grown, ev_keys, _ = t.allocate(5)
    assert sorted(grown.tolist()) == [3, 4, 5] and len(ev_keys) == 0  # the writes in flight are not evictable
    t.begin_write(grown, keys(7, 8, 9), np.zeros(3, np.uint64), np.full(3, 35))
    assert t.grow(5) == 0 and t.usable == 6  # never shrinks
    assert t.grow(8) == 2
    t.verify()
    with pytest.raises(Exception, match="cannot grow to 9 slots"):
        t.grow(9)


def test_a_tier_with_nothing_usable_yet_allocates_nothing():
    t = TierState("cpu", TierLevel.HOST, 4, PriorityLruEviction(4), usable=0)
    slots, ev_keys, _ = t.allocate(2)
    assert len(slots) == 0 and len(ev_keys) == 0
    t.verify()
    with pytest.raises(Exception, match="usable slots 5 outside"):
        TierState("cpu", TierLevel.HOST, 4, PriorityLruEviction(4), usable=5)


def test_recover_skips_slots_not_yet_usable():
    t = TierState("disk", TierLevel.DISK, 6, PriorityLruEviction(6), usable=2)
    taken = t.recover(np.array([1, 4]), keys(1, 2))
    assert taken.tolist() == [1] and (t.lookup(keys(2)) == ABSENT).all()
    t.verify()


class _OffersUnusable(PriorityLruEviction):
    """Offers slot 5, which it was never given (not usable yet), before behaving."""

    offered = False

    def victim(self):
        if not self.offered:
            self.offered = True
            return 5
        return super().victim()


def test_a_policy_offering_a_slot_that_is_not_usable_is_replaced():
    t = TierState("cpu", TierLevel.HOST, 8, _OffersUnusable(8), usable=2, fallback=PriorityLruEviction)
    store(t, keys(1, 2))
    slots, ev_keys, _ = t.allocate(1)
    assert slots.tolist() == [0] and ev_keys.tolist() == keys(1).tolist()
    assert isinstance(t.policy, PriorityLruEviction) and not isinstance(t.policy, _OffersUnusable)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_growth_keeps_every_invariant_under_random_use(data):
    n = data.draw(st.integers(1, 24))
    t = TierState("cpu", TierLevel.HOST, n, PriorityLruEviction(n), usable=data.draw(st.integers(0, n)))
    next_key = 1
    writing: list[int] = []
    held: list[int] = []
    for _ in range(data.draw(st.integers(1, 40))):
        action = data.draw(st.sampled_from(["grow", "store", "complete", "abort", "hold", "release"]))
        before = t.usable
        if action == "grow":
            target = data.draw(st.integers(0, n))
            assert t.grow(target) == max(0, target - before)
            assert t.usable == max(before, target)
        elif action == "store":
            slots, _, _ = t.allocate(data.draw(st.integers(1, 4)))
            assert (slots < t.usable).all(), "allocated a slot that is not usable"
            if len(slots):
                ks = keys(*range(next_key, next_key + len(slots)))
                next_key += len(slots)
                t.begin_write(slots, ks, np.zeros(len(slots), np.uint64), np.full(len(slots), 35))
                writing.extend(slots.tolist())
        elif action in ("complete", "abort") and writing:
            slot = writing.pop(data.draw(st.integers(0, len(writing) - 1)))
            (t.complete_write if action == "complete" else t.abort_write)(np.array([slot]))
        elif action == "hold":
            ready = np.flatnonzero(t.state == SlotState.READY)
            if len(ready):
                slot = int(ready[data.draw(st.integers(0, len(ready) - 1))])
                t.hold(np.array([slot]))
                held.append(slot)
        elif action == "release" and held:
            t.release(np.array([held.pop(data.draw(st.integers(0, len(held) - 1)))]))
        t.verify()
        assert t.usable >= before
        assert (t.state[t.usable:] == SlotState.FREE).all()
