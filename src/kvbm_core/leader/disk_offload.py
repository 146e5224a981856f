"""The background host -> disk route: admission, the queue of admitted blocks, planning copies.

A host block is *offered* (the block manager decides when: every completed host store, every skipped
duplicate host store, every host hit) unless the disk already holds or writes it; the disk
admission filter (``frequency`` by default; none when disabled) answers per block, and admitted
blocks wait here as keys. Each step, up to :data:`MAX_IN_FLIGHT` blocks of copies are in flight:
a queued block still being written to the host waits for a later step; one evicted from the host
meanwhile, or already on disk, is dropped. A copy holds its host slot (read) and writes a disk slot
(``WRITING``) until its result; a copy whose host slot was found bad meanwhile is not kept.

The queue holds unique keys, oldest first, at most the host tier's slot count (nothing older can
still be in the host).

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
        self._queue: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._capacity = max(host.num_slots, 1)

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, keys: np.ndarray) -> None:
        """Host blocks seen again (see the module docstring); admitted ones are queued."""
        if not len(keys):
            return
        keys = keys[self.disk.lookup(keys) == ABSENT]
        if len(keys) and self.admission is not None:
            keys = keys[self.admission.admit(keys)]
        self._push(keys)

    def plan(self, on_evicted: Callable[[TierState, np.ndarray, np.ndarray], None]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Claim slots for the next copies: ``(host slots, disk slots, keys, seq hashes)`` or None.

        ``on_evicted`` hears of disk blocks evicted to make room.
        """
        room = MAX_IN_FLIGHT - self.in_flight
        if room <= 0 or not self._queue:
            return None
        host, disk = self.host, self.disk
        keys = self._take(room)
        src = host.lookup(keys)
        in_host = src >= 0
        writing = np.zeros(len(keys), bool)
        writing[in_host] = host.state[src[in_host]] == SlotState.WRITING
        self._push(keys[writing])  # not readable yet: retry in a later step
        readable = host.matchable(src)
        readable[readable] = disk.lookup(keys[readable]) == ABSENT
        rows = np.flatnonzero(readable)
        if not len(rows):
            return None
        slots, ev_keys, ev_seq = disk.allocate(len(rows))
        on_evicted(disk, ev_keys, ev_seq)
        rows = rows[: len(slots)]
        if not len(rows):
            return None
        src, keys = src[rows], keys[rows]
        seq = host.seq[src].copy()
        host.hold(src)
        disk.begin_write(slots, keys, seq, host.priority[src])
        self.in_flight += len(rows)
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

    def _push(self, keys: np.ndarray) -> None:
        queue = self._queue
        for k0, k1 in keys.tolist():
            queue[(k0, k1)] = None
        while len(queue) > self._capacity:
            queue.popitem(last=False)

    def _take(self, n: int) -> np.ndarray:
        queue = self._queue
        out = [queue.popitem(last=False)[0] for _ in range(min(n, len(queue)))]
        return np.array(out, np.uint64).reshape(-1, 2)
