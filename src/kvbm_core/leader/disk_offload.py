"""The background host -> disk route: admission, the queue of admitted blocks, planning copies.

A host block is *offered* (the block manager decides when: every completed host store, every skipped
duplicate host store, every host hit) unless the disk already holds or writes it; the disk
admission filter (``frequency`` by default; none when disabled) answers per block. An admitted block
is queued, oldest first, and **held** in the host until it reached the disk: a block on its way to
the disk is never evicted first (a host tier smaller than a prompt still fills the disk with the
whole prefix; the leader's stores wait meanwhile). A block offered while its host write is still
in flight is not queued: its store offers it again when it completes.

Each step, up to :data:`MAX_IN_FLIGHT` blocks of copies are planned; a queued block's hold passes to
its copy, which releases it with its result. A copy writes a disk slot (``WRITING``) until then; a
copy whose host slot was found bad meanwhile is not kept. A block the disk has no free slot for yet
stays queued; one found bad or already on disk leaves the queue.

The filter is plugin code on the scheduling path, so the offloader calls it through
:class:`CheckedAdmission`: an answer that is not an ``[n]`` bool array, or an exception, switches
the filter off for the rest of the run with one error line naming its distribution, and from then
on the route **admits nothing**. Failing closed is the safe side for a disk admission filter: the
empty set is within what any filter could have admitted, so no block reaches the disk that the
operator's filter would have kept off it (SSD wear and write bandwidth are what such a filter
guards), and nothing is lost but future disk hits: blocks stay served from the host tier, and
blocks already on disk are still served.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import structlog

from kvbm_core.errors import PLUGIN_FAILURES
from kvbm_core.interfaces import OffloadFilter
from kvbm_core.leader.slot_state import SlotState
from kvbm_core.leader.tier_state import ABSENT, TierState

MAX_IN_FLIGHT = 256
"""Host -> disk blocks planned but not yet reported (bounds host slots held by background reads)."""

log = structlog.get_logger("kvbm.leader.disk_offload")


class CheckedAdmission:
    """An :class:`OffloadFilter` as the offloader calls it: every answer checked (see the module
    docstring). ``distribution`` names the filter's distribution in the error line."""

    def __init__(self, admission: OffloadFilter, distribution: str) -> None:
        self.admission = admission
        self.distribution = distribution
        self.failed: str | None = None

    def admit(self, keys: np.ndarray) -> np.ndarray:
        """Which of ``keys`` may move: the filter's answer, or none once it has misbehaved."""
        n = len(keys)
        if self.failed is None:
            try:
                answer = self.admission.admit(keys)
            except PLUGIN_FAILURES as exc:
                self._switch_off(f"admit() raised {exc!r}")
            else:
                if isinstance(answer, np.ndarray) and answer.dtype == np.bool_ and answer.shape == (n,):
                    return answer
                got = (f"{answer.dtype} array of shape {answer.shape}" if isinstance(answer, np.ndarray)
                       else type(answer).__qualname__)
                self._switch_off(f"admit() returned a {got} for {n} keys; expected a bool array of shape ({n},)")
        return np.zeros(n, bool)

    def _switch_off(self, problem: str) -> None:
        self.failed = problem
        log.error("disk admission filter misbehaved; host -> disk offload admits nothing from now on",
                  filter=getattr(type(self.admission), "name", type(self.admission).__qualname__),
                  distribution=self.distribution, problem=problem)


class DiskOffloader:
    """Owns the host -> disk admission and queue for one host tier and one disk tier."""

    def __init__(self, host: TierState, disk: TierState, admission: CheckedAdmission | None) -> None:
        self.host = host
        self.disk = disk
        self.admission = admission
        self.in_flight = 0
        self._queue: OrderedDict[tuple[int, int], int] = OrderedDict()  # key -> its held host slot

    def __len__(self) -> int:
        return len(self._queue)

    def queued_slots(self) -> np.ndarray:
        """Host slots the queue holds (one hold each)."""
        return np.fromiter(self._queue.values(), np.int64, len(self._queue))

    def drop_queue(self) -> int:
        """Forget every queued copy and let go of its host slot (the disk is out of service)."""
        slots = self.queued_slots()
        self._queue.clear()
        self.host.release(slots)
        return len(slots)

    def offer(self, keys: np.ndarray) -> None:
        """Host blocks seen again (see the module docstring); admitted ones are held and queued."""
        if not len(keys):
            return
        keys = keys[self.disk.lookup(keys) == ABSENT]
        if len(keys) and self.admission is not None:
            keys = keys[self.admission.admit(keys)]
        if not len(keys):
            return
        slots = self.host.lookup(keys)
        readable = self.host.matchable(slots)
        queue = self._queue
        new: list[int] = []
        for i, (k0, k1) in enumerate(keys.tolist()):
            if readable[i] and (k0, k1) not in queue:
                queue[(k0, k1)] = int(slots[i])
                new.append(int(slots[i]))
        if new:
            self.host.hold(np.array(new, np.int64))

    def plan(self, on_evicted: Callable[[TierState, np.ndarray, np.ndarray], None]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Claim disk slots for the next copies: ``(host slots, disk slots, keys, seq hashes)`` or None.

        ``on_evicted`` hears of disk blocks evicted to make room.
        """
        room = MAX_IN_FLIGHT - self.in_flight
        if room <= 0 or not self._queue:
            return None
        host, disk = self.host, self.disk
        keys, src = self._take(room)
        keep = (host.state[src] == SlotState.HELD) & (disk.lookup(keys) == ABSENT)  # not found bad, not there
        if not keep.all():
            host.release(src[~keep])
            keys, src = keys[keep], src[keep]
        if not len(keys):
            return None
        slots, ev_keys, ev_seq = disk.allocate(len(keys))
        on_evicted(disk, ev_keys, ev_seq)
        if len(slots) < len(keys):  # the disk is busy: the rest stay queued (and held), first in line
            self._return(keys[len(slots):], src[len(slots):])
            keys, src = keys[: len(slots)], src[: len(slots)]
        if not len(keys):
            return None
        seq = host.seq[src].copy()
        disk.begin_write(slots, keys, seq, host.priority[src])
        self.in_flight += len(keys)
        return src, slots, keys, seq

    def done(self, src: np.ndarray, dst: np.ndarray, failed: bool) -> np.ndarray:
        """A copy's result: release its host slots; returns which copies to keep (complete)."""
        host = self.host
        # a host slot found bad by another read while the copy ran: its copy is not kept either
        bad = np.ones(len(src), bool) if failed else host.state[src] == SlotState.DOOMED
        host.release(src)
        self.in_flight -= len(src)
        if bad.any():
            self.disk.abort_write(dst[bad])
        good = ~bad
        if good.any():
            self.disk.complete_write(dst[good])
        return good

    def _take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        queue = self._queue
        taken = [queue.popitem(last=False) for _ in range(min(n, len(queue)))]
        keys = np.array([k for k, _ in taken], np.uint64).reshape(-1, 2)
        return keys, np.array([s for _, s in taken], np.int64)

    def _return(self, keys: np.ndarray, slots: np.ndarray) -> None:
        queue = self._queue
        for (k0, k1), slot in zip(keys.tolist()[::-1], slots.tolist()[::-1]):
            queue[(k0, k1)] = slot
            queue.move_to_end((k0, k1), last=False)
