"""The parent and local hash of each block the leader hashes, handed to KV-event publishers.

A router's Stored event names, besides a block's sequence hash, its parent's sequence hash and the
hash of its own tokens; the event hooks carry only the sequence hash. The leader computes all three
in :class:`kvbm_core.identity.DynamoSequenceChain` when it plans a store. While a publisher runs, the
chain's ``lineage_sink`` appends each hashing call's arrays, as they are, to the publisher's
:class:`PendingLineage` (one deque append on the leader's thread, whatever the number of blocks).
The publisher's thread indexes them (:meth:`PendingLineage.get`) when the store's
``kvbm_blocks_stored`` reaches it, and keeps what a tier holds.

Memory is bounded on both sides: at most :data:`MAX_BATCHES` calls wait to be indexed (older ones
are forgotten: their blocks are then counted as unannounced, never guessed), and the index keeps two
generations of at most ``capacity`` blocks, forgetting the older one when the newer fills.
"""

from __future__ import annotations

import threading
from array import array
from collections import deque
from collections.abc import Callable

from kvbm_core.cluster.router_events import Lineage
from kvbm_core.identity import DynamoSequenceChain

DEFAULT_CAPACITY = 1 << 15
MAX_BATCHES = 1 << 14


class PendingLineage:
    """One publisher's view of what the leader hashed recently (see the module docstring)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._batches: deque[tuple[int | None, array, list[int]]] = deque(maxlen=MAX_BATCHES)
        self._current: dict[int, Lineage] = {}
        self._previous: dict[int, Lineage] = {}

    def record(self, parent: int | None, hashes: array, local_hashes: list[int]) -> None:
        """The chain's sink (leader thread): ``hashes[i]``'s parent is ``hashes[i-1]``, ``parent`` for the first."""
        self._batches.append((parent, hashes, local_hashes))

    def absorb(self) -> None:
        """Index what the leader recorded since the last call (publisher thread)."""
        batches = self._batches
        while batches:
            parent, hashes, local_hashes = batches.popleft()
            parents: list[int | None] = [parent]
            parents.extend(hashes[:-1])
            current = self._current
            current.update(zip(hashes, zip(parents, local_hashes)))
            if len(current) >= self.capacity:
                self._previous, self._current = current, {}

    def get(self, sequence_hash: int) -> Lineage | None:
        """``(parent, local hash)`` of a block indexed by :meth:`absorb`, if still remembered."""
        return self._current.get(sequence_hash) or self._previous.get(sequence_hash)


_attached: list[PendingLineage] = []
_lock = threading.Lock()


def attach() -> PendingLineage:
    """A new :class:`PendingLineage` that every sequence chain feeds from now on (one per publisher)."""
    pending = PendingLineage()
    with _lock:
        _attached.append(pending)
        DynamoSequenceChain.lineage_sink = _sink()
    return pending


def detach(pending: PendingLineage) -> None:
    """Stop feeding ``pending``; with none left the chains record nothing."""
    with _lock:
        if pending in _attached:
            _attached.remove(pending)
        DynamoSequenceChain.lineage_sink = _sink()


def _sink() -> Callable[[int | None, array, list[int]], None] | None:
    if not _attached:
        return None
    if len(_attached) == 1:
        return _attached[0].record
    targets = tuple(p.record for p in _attached)

    def fan_out(parent: int | None, hashes: array, local_hashes: list[int]) -> None:
        for record in targets:
            record(parent, hashes, local_hashes)

    return fan_out
