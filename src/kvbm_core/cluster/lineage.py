"""The parent and local hash of every block the leader just hashed, for KV-event publishers.

A router's Stored event names, besides a block's sequence hash, its parent's sequence hash and the
hash of its own tokens; the event hooks carry only the sequence hash. The leader computes all three
in :class:`kvbm_core.identity.DynamoSequenceChain` when it plans a store, so while a publisher runs
the chain hands them to :data:`PENDING` (its ``lineage_sink``), on the leader's thread, just before
the store. The publisher reads them when the store's ``kvbm_blocks_stored`` arrives and keeps them as
long as a tier holds the block.

Entries are never consumed (two publishers may want the same block): :data:`PENDING` keeps two
generations of at most ``capacity`` blocks each and forgets the older one when the newer fills, so
its memory is bounded (two generations of 32k blocks: a few MB) while a block hashed for a store is
remembered through tens of thousands of later blocks, far longer than a store takes.
"""

from __future__ import annotations

import threading
from array import array

from kvbm_core.cluster.router_events import Lineage
from kvbm_core.identity import DynamoSequenceChain

DEFAULT_CAPACITY = 1 << 15


class PendingLineage:
    """``sequence hash -> (parent, local hash)`` of recently hashed blocks (see the module docstring)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._current: dict[int, Lineage] = {}
        self._previous: dict[int, Lineage] = {}

    def record(self, parent: int | None, hashes: array, local_hashes: list[int]) -> None:
        """The chain's sink: ``hashes[i]``'s parent is ``hashes[i-1]`` (``parent`` for the first)."""
        if not hashes:
            return
        parents: list[int | None] = [parent]
        parents.extend(hashes[:-1])
        current = self._current
        current.update(zip(hashes, zip(parents, local_hashes)))
        if len(current) >= self.capacity:
            self._previous, self._current = current, {}

    def get(self, sequence_hash: int) -> Lineage | None:
        return self._current.get(sequence_hash) or self._previous.get(sequence_hash)


PENDING = PendingLineage()
"""The process-wide table the sequence chains feed while a publisher is attached."""

_attached = 0
_lock = threading.Lock()


def attach() -> PendingLineage:
    """Start feeding :data:`PENDING` from every sequence chain (one call per publisher)."""
    global _attached
    with _lock:
        _attached += 1
        DynamoSequenceChain.lineage_sink = PENDING.record
    return PENDING


def detach() -> None:
    """One publisher less; the last one stops the feed (the chains then record nothing)."""
    global _attached
    with _lock:
        _attached = max(0, _attached - 1)
        if _attached == 0:
            DynamoSequenceChain.lineage_sink = None
