"""kvbm-example-fifo: an eviction policy that evicts slots in the order they became evictable.

Unlike core's ``lru`` it ignores retention priorities, and a slot touched again does not move back
unless it was pinned and released in between (discard, then add). Select it in a profile::

    eviction: fifo
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from kvbm_core import hookimpl
from kvbm_core.interfaces import EvictionPolicy


class FifoEviction(EvictionPolicy):
    name = "fifo"

    def __init__(self, num_slots: int, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(num_slots, options)
        self._queue: OrderedDict[int, None] = OrderedDict()

    def add(self, slot: int, priority: int, tick: int) -> None:
        self._queue.setdefault(slot, None)

    def discard(self, slot: int) -> None:
        self._queue.pop(slot, None)

    def victim(self) -> int | None:
        return self._queue.popitem(last=False)[0] if self._queue else None

    def __len__(self) -> int:
        return len(self._queue)


@hookimpl
def kvbm_eviction_policies() -> Sequence[type[EvictionPolicy]]:
    return [FifoEviction]
