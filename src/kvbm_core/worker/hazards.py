"""Per-slot ordering of one tier on one rank: which earlier operation each new one must wait for.

The leader never reuses a slot while it knows an operation touches it, but ranks lag behind each
other and the leader acts on rank 0's completions, so each rank orders operations on its own slots:

- a read waits for the last write of the slot (read after write);
- a write waits for the last write and for the reads since it (write after write / after read).

Reads come from two places. Stream reads (host -> device loads) execute in submission order on one
stream, so the latest one stands for all before it. Host reads (background host -> disk writes, disk
reads) run in a thread pool in any order, so each waits for the previous host read of its slot
(rare: the same slot read twice at once), and the latest again stands for all.

Ticket ids increase with submission; ``-1`` means none. A slot whose last write failed is
*poisoned*: reads of it fail until a write succeeds. All arrays are numpy; no per-block loop.
"""

from __future__ import annotations

import numpy as np

NONE = -1


class SlotHazards:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.last_write = np.full(num_slots, NONE, dtype=np.int64)
        self.last_stream_read = np.full(num_slots, NONE, dtype=np.int64)
        self.last_host_read = np.full(num_slots, NONE, dtype=np.int64)
        self.poisoned = np.zeros(num_slots, dtype=bool)

    def in_range(self, slots: np.ndarray) -> bool:
        return bool(slots.size == 0 or (slots.min() >= 0 and slots.max() < self.num_slots))

    def read(self, slots: np.ndarray, ticket: int, *, stream: bool) -> np.ndarray:
        """Register a read by ``ticket``; returns the tickets it must wait for."""
        if stream:
            deps = self.last_write[slots]
            self.last_stream_read[slots] = ticket
        else:
            deps = np.concatenate([self.last_write[slots], self.last_host_read[slots]])
            self.last_host_read[slots] = ticket
        return _ids(deps)

    def write(self, slots: np.ndarray, ticket: int) -> np.ndarray:
        """Register a write by ``ticket``; returns the tickets it must wait for."""
        deps = np.concatenate([self.last_write[slots], self.last_stream_read[slots], self.last_host_read[slots]])
        self.last_write[slots] = ticket
        return _ids(deps)

    def written(self, slots: np.ndarray, ok: np.ndarray) -> None:
        """A write finished: slots with ``ok`` hold good bytes, the others do not."""
        self.poisoned[slots] = ~ok

    def bad(self, slots: np.ndarray) -> np.ndarray:
        """Positions (within ``slots``) whose last write failed."""
        return np.flatnonzero(self.poisoned[slots])


def _ids(deps: np.ndarray) -> np.ndarray:
    ids = np.unique(deps)
    return ids[ids != NONE]
