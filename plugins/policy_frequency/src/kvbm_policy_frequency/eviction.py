"""The ``scan_resistant`` eviction policy: keeps part of a working set larger than its tier.

Multi-round chat with more sessions than the host tier holds touches every session's whole context
once a round, in turn. LRU then always evicts the session that comes next, and serves nothing: a
loop (a *scan*) defeats it. This policy keeps the blocks that were already there and lets a stream of
new blocks evict itself, so a fixed part of the loop is served every round (as the LRU insertion
policy of processor caches does). Newest first also takes a request's chain of blocks from its end,
so the prefix left behind still matches. Blocks used often outrank blocks used once, and blocks left
idle much longer than blocks are usually reused after are let go first, so a working set that moves
on is followed, one horizon later. ``benchmarks/eviction_policies.py`` measures it against ``lru``.

Rules, within one retention priority (a lower priority is always evicted first, as with ``lru``):

1. A block the tier adds for the first time (stored) is on *probation*. Each later add of the same
   slot (a use: the tier adds a slot again when the last read holding it ends) moves it one
   frequency level up, to at most ``levels``.
2. The victim is the block idle longest, if that is longer than the *horizon*; else the most
   recently stored probationary block (newest first); else the least recently used block of the
   lowest frequency level.
3. The horizon is ``horizon_factor`` times a running 90th percentile of how long blocks had been
   idle when they were used again, and never less than the tier's slot count. Until uses teach it,
   it is ``initial_horizon`` times the slot count.

Time counts this policy's ``add`` calls (one per block stored or used); the ``tick`` argument is not
needed. Each call is O(1) but for the rare first block of a new priority (O(priorities)), and
``victim`` looks at the oldest entry of each of ``levels + 1`` queues.

A slot keeps its frequency while it is out of the queues because it was offered as a victim and
the tier skipped it (held): the tier adds it back when released, as a use. ``discard`` forgets a slot
entirely (its block left the tier; the tier discards every slot whose block it drops), and an unknown
slot is ignored. The tier cannot tell the policy a load from the end of a background copy (host ->
disk): both count as uses, which is why the horizon's estimate moves slowly.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from kvbm_core.errors import ConfigError
from kvbm_core.interfaces import EvictionPolicy

OPTIONS_KEY = "eviction_options"
DEFAULTS: Mapping[str, float] = {"levels": 3, "horizon_factor": 2.0, "initial_horizon": 4.0}
MAX_LEVELS = 8

_QUANTILE = 0.9
"""Which quantile of the idle time at reuse the horizon follows."""
_RATE = 4.0
"""Speed of the running quantile (stochastic approximation in log space): each reuse moves it up by
``_QUANTILE * _RATE / num_slots`` or down by ``(1 - _QUANTILE) * _RATE / num_slots`` of itself. It
settles where 90% of reuses come sooner; one tier size of reuses moves it by at most a factor
``e**(0.9 * _RATE)`` up or ``e**(0.1 * _RATE)`` down, whatever the tier's size. Measured with
benchmarks/eviction_policies.py: at 2 it lets an old working set go later (``shifting-users``); at
about 20 a burst of short reuses (the ends of host -> disk copies, ``--disk``) pulls it below a
loop's period and the loop is lost."""


class ScanResistantEviction(EvictionPolicy):
    """Probation newest-first, frequency levels least-recently-used first, stale blocks before both."""

    name = "scan_resistant"

    def __init__(self, num_slots: int, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(num_slots, options)
        self.levels, self.horizon_factor, initial = _resolved(self.options, OPTIONS_KEY)
        self._reuse_idle = initial * num_slots / self.horizon_factor  # running quantile, in adds
        self._step = _RATE / max(num_slots, 1)
        self._clock = 0
        # per priority: queues[0] is probation, queues[k] frequency level k; slot -> clock, oldest first
        self._queues: dict[int, list[OrderedDict[int, int]]] = {}
        self._sizes: dict[int, int] = {}
        self._priorities: list[int] = []  # sorted priorities with a non-empty bucket
        self._place: dict[int, tuple[int, int]] = {}  # queued slot -> (priority, queue)
        self._history: dict[int, tuple[int, int]] = {}  # known slot -> (clock of its last add, level)

    @classmethod
    def validate_options(cls, options: Mapping[str, Any], key: str = OPTIONS_KEY) -> None:
        """Raise :class:`~kvbm_core.errors.ConfigError` naming ``key.<option>`` for a bad option."""
        _resolved(options, key)

    @property
    def horizon(self) -> float:
        """Blocks idle for more adds than this are evicted first."""
        return max(float(self.num_slots), self.horizon_factor * self._reuse_idle)

    def add(self, slot: int, priority: int, tick: int) -> None:
        self._clock += 1
        clock = self._clock
        past = self._history.get(slot)
        if past is None:
            level = 0
        else:
            self._observe_reuse(clock - past[0])
            level = min(past[1] + 1, self.levels)
        self._unqueue(slot)
        queues = self._queues.get(priority)
        if queues is None:
            queues = self._queues[priority] = [OrderedDict() for _ in range(self.levels + 1)]
            self._sizes[priority] = 0
            bisect.insort(self._priorities, priority)
        queues[level][slot] = clock
        self._sizes[priority] += 1
        self._place[slot] = (priority, level)
        self._history[slot] = (clock, level)

    def discard(self, slot: int) -> None:
        self._unqueue(slot)
        self._history.pop(slot, None)

    def victim(self) -> int | None:
        if not self._priorities:
            return None
        priority = self._priorities[0]
        queues = self._queues[priority]
        stalest, oldest = None, self._clock - self.horizon
        for queue in queues:
            if queue:
                first = next(iter(queue.values()))
                if first < oldest:
                    stalest, oldest = queue, first
        if stalest is not None:
            slot, _ = stalest.popitem(last=False)
        elif queues[0]:
            slot, _ = queues[0].popitem(last=True)
        else:
            slot, _ = next(q for q in queues if q).popitem(last=False)
        del self._place[slot]
        self._shrink(priority)
        return slot

    def __len__(self) -> int:
        return len(self._place)

    def _observe_reuse(self, idle: int) -> None:
        if idle > self._reuse_idle:
            self._reuse_idle *= 1 + self._step * _QUANTILE
        else:
            self._reuse_idle = max(1.0, self._reuse_idle * (1 - self._step * (1 - _QUANTILE)))

    def _unqueue(self, slot: int) -> None:
        place = self._place.pop(slot, None)
        if place is not None:
            priority, queue = place
            del self._queues[priority][queue][slot]
            self._shrink(priority)

    def _shrink(self, priority: int) -> None:
        self._sizes[priority] -= 1
        if not self._sizes[priority]:
            del self._sizes[priority], self._queues[priority]
            self._priorities.pop(bisect.bisect_left(self._priorities, priority))


def _resolved(options: Mapping[str, Any], key: str) -> tuple[int, float, float]:
    """``(levels, horizon_factor, initial_horizon)`` from ``options``, or a ConfigError naming the option."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown option of eviction 'scan_resistant'", DEFAULTS.keys())
    opts = {**DEFAULTS, **options}
    levels = opts["levels"]
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= MAX_LEVELS:
        raise ConfigError(f"{key}.levels", f"got {levels!r}", f"a whole number from 1 to {MAX_LEVELS}")
    numbers = []
    for name in ("horizon_factor", "initial_horizon"):
        value = opts[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
            raise ConfigError(f"{key}.{name}", f"got {value!r}", "a finite number >= 1")
        numbers.append(float(value))
    return levels, numbers[0], numbers[1]
