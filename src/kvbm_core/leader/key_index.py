"""A tier's key -> slot index as an open-addressing hash table in numpy (vectorized lookups).

A 20k-token prompt is 625 lookups; a Python dict of 64-bit ints costs about 0.1 us per lookup plus
the conversion of each key to a Python int, while one batched probe over numpy arrays costs a few
microseconds for all of them. The table is keyed by a block key's first 64-bit lane (already a
well-mixed hash) and stores the slot; the tier confirms the second lane.

Linear probing in a power-of-two table at most a quarter full of live entries (short probe runs).
Each entry is one 16-byte row ``(lane, slot)``, so a probe touches one cache line (lookups against a
large tier are bound by memory latency, not arithmetic). A lookup probes all keys at once for a few
rounds; the handful still unresolved (long runs) finish in a scalar loop, so a batch costs a fixed
number of numpy calls. Removal leaves a tombstone, which lookups step over and inserts reuse; when
live entries plus tombstones pass half the table, it is rebuilt from the live entries. Inserted keys
must be absent (the tier looks them up first) and unique within the batch.
"""

from __future__ import annotations

import numpy as np

LOAD_FACTOR_INVERSE = 4
VECTOR_ROUNDS = 3
EMPTY = np.uint64(2**64 - 1)
TOMBSTONE = np.uint64(2**64 - 2)
_FREE_FROM = np.uint64(2**64 - 2)  # slot column values >= this mark a row without a live entry


class KeyIndex:
    """First-lane -> slot map for up to ``capacity`` live entries."""

    def __init__(self, capacity: int) -> None:
        size = 16
        while size < LOAD_FACTOR_INVERSE * max(capacity, 1):
            size *= 2
        self.capacity = capacity
        self._mask = np.uint64(size - 1)
        self._table = self._empty(size)
        self._live = 0
        self._tombstones = 0

    @staticmethod
    def _empty(size: int) -> np.ndarray:
        table = np.zeros((size, 2), np.uint64)
        table[:, 1] = EMPTY
        return table

    def __len__(self) -> int:
        return self._live

    def _home(self, lanes: np.ndarray) -> np.ndarray:
        return (lanes & self._mask).astype(np.int64)

    def _positions(self, lanes: np.ndarray) -> np.ndarray:
        """Table position holding each lane, or -1."""
        out = np.full(len(lanes), -1, np.int64)
        if not len(lanes):
            return out
        mask = int(self._mask)
        pending = np.arange(len(lanes))
        idx = self._home(lanes)
        want = lanes
        table = self._table
        for _ in range(VECTOR_ROUNDS):
            rows = table[idx]
            slot = rows[:, 1]
            hit = (rows[:, 0] == want) & (slot < _FREE_FROM)
            out[pending[hit]] = idx[hit]
            go_on = ~hit & (slot != EMPTY)
            if not go_on.any():
                return out
            pending, want = pending[go_on], want[go_on]
            idx = (idx[go_on] + 1) & mask
        empty, free_from = int(EMPTY), int(_FREE_FROM)
        for i, lane, pos in zip(pending.tolist(), want.tolist(), idx.tolist()):
            while True:
                row_lane, row_slot = table[pos].tolist()
                if row_lane == lane and row_slot < free_from:
                    out[i] = pos
                    break
                if row_slot == empty:
                    break
                pos = (pos + 1) & mask
        return out

    def get(self, lanes: np.ndarray) -> np.ndarray:
        """Slot of each lane, or -1 when absent."""
        pos = self._positions(lanes)
        found = pos >= 0
        out = np.full(len(lanes), -1, np.int64)
        if found.all():
            return self._table[pos, 1].astype(np.int64)
        out[found] = self._table[pos[found], 1]
        return out

    def insert(self, lanes: np.ndarray, slots: np.ndarray) -> None:
        """Add entries for absent, batch-unique ``lanes``."""
        n = len(lanes)
        if not n:
            return
        if len(np.unique(lanes)) != n:
            raise ValueError("KeyIndex.insert: duplicate lanes in one batch")
        if self._live + self._tombstones + n > len(self._table) // 2:
            self._rebuild(extra=n)
        mask = int(self._mask)
        pending = np.arange(n)
        idx = self._home(lanes)
        table = self._table
        while len(pending):
            free = table[idx, 1] >= _FREE_FROM
            cand, cidx = pending[free], idx[free]
            taken, first = np.unique(cidx, return_index=True)
            winners = cand[first]
            self._tombstones -= int(np.count_nonzero(table[taken, 1] == TOMBSTONE))
            table[taken, 0] = lanes[winners]
            table[taken, 1] = slots[winners]
            placed = np.zeros(len(pending), bool)
            placed[np.flatnonzero(free)[first]] = True
            pending, idx = pending[~placed], (idx[~placed] + 1) & mask
        self._live += n

    def remove(self, lanes: np.ndarray, slots: np.ndarray) -> None:
        """Drop the entries ``lane -> slot`` that exist (others are ignored)."""
        pos = self._positions(lanes)
        ok = pos >= 0
        ok[ok] = self._table[pos[ok], 1] == np.asarray(slots, np.uint64)[ok]
        pos = pos[ok]
        self._table[pos, 1] = TOMBSTONE
        self._live -= len(pos)
        self._tombstones += len(pos)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All live ``(lanes, slots)``."""
        live = self._table[:, 1] < _FREE_FROM
        return self._table[live, 0].copy(), self._table[live, 1].astype(np.int64)

    def _rebuild(self, extra: int) -> None:
        lanes, slots = self.items()
        size = len(self._table)
        while LOAD_FACTOR_INVERSE * (self._live + extra) > size:
            size *= 2
        self._mask = np.uint64(size - 1)
        self._table = self._empty(size)
        self._live = self._tombstones = 0
        self.insert(lanes, slots)
