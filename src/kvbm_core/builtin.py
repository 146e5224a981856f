"""Core's own plugins, registered through the ``kvbm`` entry-point group like any other.

- ``lru`` eviction: lowest retention priority first, then least recently made evictable.
- ``inproc`` transport: leader and workers of one process talk through memory.
- ``etcd`` and ``nats`` transports (:mod:`kvbm_core.transports`): discovery and KV events.
- the Prometheus exporter (:mod:`kvbm_core.metrics`): its event hooks are re-exported here, so
  that this module is the one plugin object pluggy registers for core.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Sequence

from kvbm_core.hookspecs import hookimpl
from kvbm_core.interfaces import EvictionPolicy, Transport
from kvbm_core.metrics import (  # noqa: F401  (hook implementations of the exporter)
    kvbm_blocks_offloaded,
    kvbm_blocks_onboarded,
    kvbm_blocks_removed,
    kvbm_blocks_stored,
    kvbm_pipeline_built,
    kvbm_pipeline_closed,
    kvbm_request_finished,
    kvbm_request_matched,
    kvbm_transfer_failed,
)
from kvbm_core.transports import EtcdTransport, NatsTransport


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


class InProcessTransport(Transport):
    """Leader and workers share one process (TP=1, or the reference executor's simulated ranks).

    Needs no server: control traffic goes through :mod:`kvbm_core.channel` in memory.
    """

    name = "inproc"

    def close(self) -> None:
        pass


@hookimpl
def kvbm_eviction_policies() -> Sequence[type[EvictionPolicy]]:
    return [PriorityLruEviction]


@hookimpl
def kvbm_transports() -> Sequence[type[Transport]]:
    return [InProcessTransport, EtcdTransport, NatsTransport]
