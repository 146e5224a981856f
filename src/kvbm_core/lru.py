"""Core's eviction policy, ``lru``: lowest retention priority first, then least recently made evictable.

It lives apart from :mod:`kvbm_core.builtin` (which registers it) because the leader also uses it
directly: it takes over a tier whose configured policy misbehaves.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict

from kvbm_core.interfaces import EvictionPolicy


class PriorityLruEviction(EvictionPolicy):
    """Evicts the lowest retention priority first and, within a priority, the oldest.

    TRT-LLM passes retention priorities (0-100, default 35) where it has them; everything else
    shares one priority and this is plain LRU. Each operation is O(1) but for the rare new priority.
    """

    name = "lru"

    def __init__(self, num_slots: int, options=None) -> None:
        super().__init__(num_slots, options)
        self._buckets: dict[int, OrderedDict[int, None]] = {}
        self._priorities: list[int] = []  # sorted priorities with a non-empty bucket
        self._priority_of: dict[int, int] = {}

    def add(self, slot: int, priority: int, tick: int) -> None:
        self.discard(slot)
        bucket = self._buckets.get(priority)
        if bucket is None:
            bucket = self._buckets[priority] = OrderedDict()
            bisect.insort(self._priorities, priority)
        bucket[slot] = None
        self._priority_of[slot] = priority

    def discard(self, slot: int) -> None:
        priority = self._priority_of.pop(slot, None)
        if priority is None:
            return
        bucket = self._buckets[priority]
        del bucket[slot]
        if not bucket:
            self._drop_bucket(priority)

    def victim(self) -> int | None:
        if not self._priorities:
            return None
        priority = self._priorities[0]
        bucket = self._buckets[priority]
        slot, _ = bucket.popitem(last=False)
        del self._priority_of[slot]
        if not bucket:
            self._drop_bucket(priority)
        return slot

    def __len__(self) -> int:
        return len(self._priority_of)

    def _drop_bucket(self, priority: int) -> None:
        del self._buckets[priority]
        self._priorities.pop(bisect.bisect_left(self._priorities, priority))
