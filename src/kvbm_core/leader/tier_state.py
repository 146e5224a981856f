"""The logical state of one tier: which block lives in which slot, and who may touch it.

A :class:`TierState` owns, per slot, its :class:`~kvbm_core.leader.slot_state.SlotState`, its hold
count (promises plus in-flight reads), its key, Dynamo sequence hash and retention priority; plus the
key -> slot index, the free list and the tier's :class:`~kvbm_core.interfaces.EvictionPolicy`. It
owns no bytes and plans no operations: the block manager calls it.

Choices:

- **Index** (:class:`~kvbm_core.leader.key_index.KeyIndex`, vectorized): keyed by a key's first
  64-bit lane; every hit is confirmed on the second lane. A *different* key whose first lane is
  already indexed (probability about 2**-64 per pair) is reported as :data:`CLASH`: neither matched
  nor stored in this tier.
- **Allocation** takes free slots first, then victims from the eviction policy. Only ``READY``
  slots are ever evicted; a slot referenced by an unreported operation is ``WRITING`` or ``HELD``.
- **A tier that grows.** Only the first :attr:`TierState.usable` slots take part: a tier whose
  storage is still being allocated on the workers (``HostStorage.ready_slots``) starts with the
  part every rank has, and :meth:`TierState.grow` adds slots as the smallest count of all ranks
  rises. Slots beyond are ``FREE`` but in no free list, never allocated, recovered or evicted.
- **Lazy removal from the policy.** A ``READY`` slot that becomes ``HELD`` stays in the policy
  (telling the policy slot by slot would cost a Python call per matched block); when the policy
  offers it as a victim the tier skips it, and when its last hold goes the slot is added again, as
  the most recently used. The policy thus sees the same ``add``/``discard``/``victim`` calls with
  one relaxation: it may hold slots that are no longer evictable, which this class filters.
- Every state change goes through :meth:`_move`, which checks the whole batch against
  :data:`~kvbm_core.leader.slot_state.TRANSITIONS` and raises :class:`SlotStateError` naming the
  first offending slot: an illegal transition is a bug, never silently absorbed.
- **A misbehaving policy is replaced, never obeyed.** The policy is plugin code on the scheduling
  path. A policy call that raises, a victim that is not a slot, a slot offered twice in one
  allocation (a correct policy removes what it offers, and nothing is added during an allocation,
  so this also bounds the loop to ``num_slots`` offers), or None while ``READY`` slots exist (every
  ``READY`` slot was added) makes the tier log one error line naming the policy's distribution and
  hand its evictable slots, in the order they became evictable, to the ``fallback`` policy (core's
  ``lru``). Without a fallback it is a :class:`~kvbm_core.errors.PluginError` naming the
  distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import structlog

from kvbm_core.errors import PLUGIN_FAILURES, KvbmError, PluginError
from kvbm_core.interfaces import EvictionPolicy, TierLevel
from kvbm_core.leader.key_index import ABSENT, CLASH, KeyIndex
from kvbm_core.leader.slot_state import MATCHABLE_MASK, TRANSITIONS, SlotState

__all__ = ["ABSENT", "CLASH", "DEFAULT_PRIORITY", "SlotStateError", "TierState"]

log = structlog.get_logger("kvbm.leader.tier_state")

DEFAULT_PRIORITY = 35
"""TRT-LLM's default retention priority, used where the engine reports none."""


_INTO = {t: np.ascontiguousarray(TRANSITIONS[:, int(t)]) for t in SlotState}
"""Per target state: which current states may move into it (a column of the transition matrix)."""


class SlotStateError(KvbmError):
    """An operation asked for a slot transition that :mod:`slot_state` does not allow."""

    def __init__(self, tier: str, slot: int, state: SlotState, target: SlotState):
        self.tier, self.slot, self.state, self.target = tier, slot, state, target
        super().__init__(f"tier {tier!r} slot {slot}: illegal transition {state.name} -> {target.name}")


class _PolicyMisbehaved(Exception):
    """Internal: the policy broke its contract (the message says how)."""


class TierState:
    """Slots of one tier (``kind`` at ``level``), as the leader sees them.

    ``policy_distribution`` names the distribution of ``policy`` in errors and logs; ``fallback``
    builds the policy that takes over from a misbehaving one (see the module docstring).
    ``usable`` (default: all) is how many leading slots may be allocated until :meth:`grow`.
    """

    def __init__(self, kind: str, level: TierLevel, num_slots: int, policy: EvictionPolicy, *,
                 policy_distribution: str = "(unknown)",
                 fallback: Callable[[int], EvictionPolicy] | None = None, usable: int | None = None) -> None:
        usable = num_slots if usable is None else usable
        if not 0 <= usable <= num_slots:
            raise KvbmError(f"tier {kind!r}: usable slots {usable} outside [0, {num_slots}] (caller bug)")
        self.kind = kind
        self.level = level
        self.num_slots = num_slots
        self.usable = usable
        self.policy = policy
        self.policy_distribution = policy_distribution
        self._fallback = fallback
        self._replaced = False
        self.state = np.zeros(num_slots, np.int8)
        self.holds = np.zeros(num_slots, np.int32)
        self.keys = np.zeros((num_slots, 2), np.uint64)
        self.seq = np.zeros(num_slots, np.uint64)
        self.priority = np.full(num_slots, DEFAULT_PRIORITY, np.int16)
        self.evictable_since = np.zeros(num_slots, np.int64)  # tick of the last add, for a fallback
        self._index = KeyIndex(num_slots)
        self._free: list[int] = list(range(usable - 1, -1, -1))
        self._tick = 0

    def grow(self, usable: int) -> int:
        """Make the first ``usable`` slots allocatable (every rank's storage now holds them); returns
        how many slots that added. The count never shrinks: a smaller one is ignored."""
        if not 0 <= usable <= self.num_slots:
            raise KvbmError(f"tier {self.kind!r}: cannot grow to {usable} slots, it has {self.num_slots}")
        added = usable - self.usable
        if added <= 0:
            return 0
        self._free[:0] = range(usable - 1, self.usable - 1, -1)  # below the free slots it had: those go first
        self.usable = usable
        return added

    # ------------------------------------------------------------------------------ queries
    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key (any registered state), :data:`ABSENT`, or :data:`CLASH`."""
        return self._index.get(keys)

    def matchable(self, slots: np.ndarray) -> np.ndarray:
        """Which of ``slots`` (from :meth:`lookup`) hold readable bytes a request may be promised."""
        ok = slots >= 0
        ok &= MATCHABLE_MASK.take(self.state.take(slots, mode="clip"))  # clip: negatives are masked
        return ok

    def count(self, state: SlotState) -> int:
        return int(np.count_nonzero(self.state == state))

    def __len__(self) -> int:
        """Slots holding a registered block (writing, ready or held)."""
        return len(self._index)

    # --------------------------------------------------------------------------- allocation
    def allocate(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Up to ``n`` slots for new blocks, as ``(slots, evicted_keys, evicted_seq)``.

        Evicted slots leave the index here; the caller reports them (``kvbm_blocks_removed``). The
        returned slots are ``FREE`` and out of the free list: the caller must claim every one of
        them with :meth:`begin_write` at once.
        """
        out: list[int] = []
        free = self._free
        while free and len(out) < n:
            out.append(free.pop())
        evicted: list[int] = []
        offered: set[int] = set()
        state = self.state
        while len(out) < n:
            try:
                victim = self._next_victim(offered, len(evicted))
            except _PolicyMisbehaved as exc:
                self._replace_policy(str(exc), leaving=evicted)
                offered.clear()
                continue
            if victim is None:
                break
            if state[victim] != SlotState.READY:  # held since it was added: skipped (see module doc)
                continue
            evicted.append(victim)
            out.append(victim)
        if evicted:
            ev = np.array(evicted, np.int64)
            ev_keys, ev_seq = self.keys[ev].copy(), self.seq[ev].copy()
            self._unindex(ev)
            self._move(ev, SlotState.FREE)
        else:
            ev_keys, ev_seq = np.zeros((0, 2), np.uint64), np.zeros(0, np.uint64)
        return np.array(out, np.int64), ev_keys, ev_seq

    # ------------------------------------------------------------------------------ writes
    def begin_write(self, slots: np.ndarray, keys: np.ndarray, seq: np.ndarray, priority: np.ndarray) -> None:
        """``FREE -> WRITING``: register ``keys`` so the same blocks are not stored again.

        The keys must be absent (callers have just looked them up) and distinct; a key already indexed
        is a caller bug, refused here rather than silently double-booked.
        """
        if (self._index.get(keys) != ABSENT).any():
            raise KvbmError(f"tier {self.kind!r}: begin_write of a key that is already indexed (caller bug)")
        self._move(slots, SlotState.WRITING)
        self.keys[slots] = keys
        self.seq[slots] = seq
        self.priority[slots] = priority
        self._index.insert(keys, slots)

    def complete_write(self, slots: np.ndarray) -> None:
        """``WRITING -> READY``: the bytes are there; the blocks become matchable and evictable."""
        self._move(slots, SlotState.READY)
        self._make_evictable(slots)

    def abort_write(self, slots: np.ndarray) -> None:
        """``WRITING -> FREE``: the write failed (or its bytes are suspect); forget the blocks."""
        self._unindex(slots)
        self._move(slots, SlotState.FREE)
        self._free.extend(slots.tolist())

    def recover(self, slots: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """``FREE -> READY`` for blocks a restarted tier found valid; returns the slots taken.

        Slots already in use or not yet usable, and keys already indexed (or clashing) are skipped.
        """
        slots = np.asarray(slots, np.int64)
        keys = np.asarray(keys, np.uint64).reshape(-1, 2)
        in_range = (slots >= 0) & (slots < self.usable)
        slots, keys = slots[in_range], keys[in_range]
        _, first = np.unique(keys[:, 0], return_index=True)
        keep = np.zeros(len(slots), bool)
        keep[np.sort(first)] = True
        _, first_slot = np.unique(slots, return_index=True)
        unique_slot = np.zeros(len(slots), bool)
        unique_slot[first_slot] = True
        keep &= unique_slot & (self.state[slots] == SlotState.FREE) & (self.lookup(keys) == ABSENT)
        slots, keys = slots[keep], keys[keep]
        if len(slots):
            self._move(slots, SlotState.WRITING)  # written by the previous run
            self._move(slots, SlotState.READY)
            self.keys[slots] = keys
            self.seq[slots] = 0
            self.priority[slots] = DEFAULT_PRIORITY
            self._index.insert(keys, slots)
            taken = set(slots.tolist())
            self._free = [s for s in self._free if s not in taken]
            self._make_evictable(slots)
        return slots

    # ------------------------------------------------------------------------------- holds
    def hold(self, slots: np.ndarray) -> None:
        """``READY|HELD -> HELD``, one more hold each (a promise, or a read in flight); slots unique."""
        self._move(slots, SlotState.HELD)
        self.holds[slots] += 1

    def release(self, slots: np.ndarray) -> None:
        """One hold less each; ``HELD -> READY`` (evictable again) or ``DOOMED -> FREE`` at zero."""
        if len(slots) == 0:
            return
        if (self.holds[slots] <= 0).any():
            bad = int(slots[self.holds[slots] <= 0][0])
            raise SlotStateError(self.kind, bad, SlotState(int(self.state[bad])), SlotState.READY)
        self.holds[slots] -= 1
        done = slots[self.holds[slots] == 0]
        if len(done):
            doomed = done[self.state[done] == SlotState.DOOMED]
            ready = done[self.state[done] == SlotState.HELD]
            if len(ready):
                self._move(ready, SlotState.READY)
                self._make_evictable(ready)
            if len(doomed):
                self._move(doomed, SlotState.FREE)
                self._free.extend(doomed.tolist())

    def invalidate(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``HELD -> DOOMED`` for slots whose bytes failed a read; returns their keys and seq hashes."""
        slots = slots[self.state[slots] == SlotState.HELD]
        keys, seq = self.keys[slots].copy(), self.seq[slots].copy()
        self._unindex(slots)
        self._move(slots, SlotState.DOOMED)
        return keys, seq

    # ---------------------------------------------------------------------- eviction policy
    def _next_victim(self, offered: set[int], evicted: int) -> int | None:
        """The policy's next offer, checked (see the module docstring); ``offered`` grows by it."""
        try:
            victim = self.policy.victim()
        except PLUGIN_FAILURES as exc:
            raise _PolicyMisbehaved(f"victim() raised {exc!r}") from exc
        if victim is None:
            ready = self.count(SlotState.READY) - evicted
            if ready > 0:
                raise _PolicyMisbehaved(f"victim() returned None while {ready} slots are evictable")
            return None
        if isinstance(victim, bool) or not isinstance(victim, (int, np.integer)) or not 0 <= victim < self.usable:
            raise _PolicyMisbehaved(f"victim() returned {victim!r}, not a usable slot in [0, {self.usable})")
        victim = int(victim)
        if victim in offered:
            raise _PolicyMisbehaved(f"victim() offered slot {victim} twice in one allocation")
        offered.add(victim)
        return victim

    def _replace_policy(self, problem: str, leaving: Sequence[int] | np.ndarray = ()) -> None:
        """Hand the evictable slots (``READY``, except ``leaving``) to the fallback policy."""
        broken = type(self.policy)
        label = f"eviction policy {getattr(broken, 'name', '?')!r} ({broken.__qualname__}) on tier {self.kind!r}"
        if self._replaced:
            raise KvbmError(f"the fallback {label}: {problem} (a bug in kvbm)")
        if self._fallback is None:
            raise PluginError(self.policy_distribution, f"{label}: {problem}")
        log.error("eviction policy misbehaved; the built-in policy takes over for this tier", tier=self.kind,
                  policy=getattr(broken, "name", broken.__qualname__), distribution=self.policy_distribution,
                  problem=problem)
        policy = self._fallback(self.num_slots)
        ready = np.flatnonzero(self.state == SlotState.READY)
        ready = ready[~np.isin(ready, np.asarray(leaving, np.int64))]
        ready = ready[np.argsort(self.evictable_since[ready], kind="stable")]
        for slot, prio, tick in zip(ready.tolist(), self.priority[ready].tolist(),
                                    self.evictable_since[ready].tolist()):
            policy.add(slot, prio, tick)
        self.policy = policy
        self._replaced = True

    # ----------------------------------------------------------------------------- helpers
    def _move(self, slots: np.ndarray, target: SlotState) -> None:
        current = self.state.take(slots)
        allowed = _INTO[target].take(current)
        if not allowed.all():
            i = int(np.flatnonzero(~allowed)[0])
            raise SlotStateError(self.kind, int(slots[i]), SlotState(int(current[i])), target)
        self.state[slots] = int(target)

    def _make_evictable(self, slots: Sequence[int] | np.ndarray) -> None:
        policy, priority = self.policy, self.priority
        first = self._tick + 1
        self._tick += len(slots)
        self.evictable_since[slots] = np.arange(first, self._tick + 1)
        try:
            for slot, prio, tick in zip(np.asarray(slots).tolist(), priority[slots].tolist(),
                                        range(first, self._tick + 1)):
                policy.add(slot, prio, tick)
        except PLUGIN_FAILURES as exc:
            self._replace_policy(f"add() raised {exc!r}")  # the new policy gets these slots too

    def _unindex(self, slots: np.ndarray) -> None:
        self._index.remove(self.keys[slots], slots)
        try:
            for slot in np.asarray(slots).tolist():
                self.policy.discard(slot)
        except PLUGIN_FAILURES as exc:
            self._replace_policy(f"discard() raised {exc!r}", leaving=slots)

    # ---------------------------------------------------------------------------- checking
    def verify(self) -> None:
        """Check the internal invariants (tests call this after every step); raise AssertionError."""
        state = self.state
        registered = np.flatnonzero((state == SlotState.WRITING) | (state == SlotState.READY) | (state == SlotState.HELD))
        keys, slots = self._index.items()
        assert len(self._index) == len(registered) == len(slots), (self.kind, len(self._index), len(registered))
        assert np.array_equal(np.sort(slots), registered), self.kind
        assert np.array_equal(self.keys[slots], keys), self.kind
        assert np.array_equal(self._index.get(keys), slots), (self.kind, "an entry is not reachable by probing")
        held = (state == SlotState.HELD) | (state == SlotState.DOOMED)
        assert (self.holds[held] > 0).all(), self.kind
        assert (self.holds[~held] == 0).all(), self.kind
        free = np.flatnonzero(state[:self.usable] == SlotState.FREE)
        assert sorted(self._free) == free.tolist(), self.kind
        assert len(set(self._free)) == len(self._free), self.kind
        assert (state[self.usable:] == SlotState.FREE).all(), (self.kind, "a slot beyond the usable ones is in use")

