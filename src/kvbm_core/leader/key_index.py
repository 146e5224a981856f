"""A tier's key -> slot index as an open-addressing hash table in numpy (vectorized lookups).

A 20k-token prompt is 625 lookups. A Python dict costs a conversion of each key to a Python int and
a few dependent memory accesses per lookup; here one batched probe gathers the candidate rows of all
keys at once. Lookups against a large tier are bound by memory latency, so each entry is one
32-byte row ``(lane0, lane1, slot, unused)``: a probe touches one cache line and the second lane is
confirmed from the same row.

Entries are placed by a key's first 64-bit lane (already a well-mixed hash), one entry per first
lane: a different key whose first lane is taken (probability about 2**-64 per pair) is reported as
:data:`CLASH`. Linear probing in a power-of-two table at most a quarter full of live entries. A
lookup gathers every key's home row at once, then the next rows of the few keys that must probe
further, so a batch costs a fixed number of numpy calls. Removal leaves a tombstone, which
lookups step over and inserts reuse; when live entries plus tombstones pass half the table, it is
rebuilt from the live entries. Inserted keys must be absent and their first lanes unique.
"""

from __future__ import annotations

import numpy as np

ABSENT = -1
CLASH = -2
LOAD_FACTOR_INVERSE = 4
PROBE_WINDOW = 4
EMPTY = np.uint64(2**64 - 1)
TOMBSTONE = np.uint64(2**64 - 2)
_FREE_FROM = TOMBSTONE  # slot column values >= this mark a row without a live entry
_LANE0, _LANE1, _SLOT = 0, 1, 2
assert np.array(EMPTY).view(np.int64) == ABSENT
_WINDOW_STEPS = np.arange(1, PROBE_WINDOW + 1)
_SCALAR_PROBES = 16  # this few keys left to probe: a Python loop beats a vectorized round
_SCALAR_BATCH = 16  # batches this small (decode steps) skip numpy altogether


class KeyIndex:
    """``[2]``-uint64 key -> slot map for up to ``capacity`` live entries."""

    def __init__(self, capacity: int) -> None:
        size = 16
        while size < LOAD_FACTOR_INVERSE * max(capacity, 1):
            size *= 2
        self.capacity = capacity
        self._mask = np.uint64(size - 1)
        self._mask_i64 = np.int64(size - 1)
        self._table = self._empty(size)
        self._live = 0
        self._tombstones = 0

    @staticmethod
    def _empty(size: int) -> np.ndarray:
        table = np.zeros((size, 4), np.uint64)
        table[:, _SLOT] = EMPTY
        return table

    def __len__(self) -> int:
        return self._live

    def _positions(self, lanes: np.ndarray) -> np.ndarray:
        """Table position of the entry for each first lane, or -1.

        One gather of every key's home row; keys that must probe further get one gather of the
        next :data:`PROBE_WINDOW` rows each; runs longer than that (rare at this load) finish in a
        scalar loop.
        """
        n = len(lanes)
        out = np.full(n, -1, np.int64)
        if not n:
            return out
        table = self._table
        idx = (lanes & self._mask).astype(np.int64)
        rows = np.take(table, idx, axis=0)  # a row gather (much cheaper than table[idx])
        slot = rows[:, _SLOT]
        hit = (rows[:, _LANE0] == lanes) & (slot < _FREE_FROM)
        out[hit] = idx[hit]
        rest = np.flatnonzero(~hit & (slot != EMPTY))
        if len(rest):
            self._probe_further(lanes, idx, rest, out)
        return out

    def _probe_further(self, lanes: np.ndarray, idx: np.ndarray, rest: np.ndarray, out: np.ndarray) -> None:
        table, mask = self._table, int(self._mask)
        if len(rest) <= _SCALAR_PROBES:
            self._probe_scalar(lanes, idx, rest, out, 1)
            return
        window = (idx[rest, None] + _WINDOW_STEPS) & mask
        rows = np.take(table, window, axis=0)
        slot = rows[:, :, _SLOT]
        match = (rows[:, :, _LANE0] == lanes[rest, None]) & (slot < _FREE_FROM)
        stop = match | (slot == EMPTY)
        ended = stop.any(axis=1)
        first = stop.argmax(axis=1)
        found = ended & match[np.arange(len(rest)), first]
        out[rest[found]] = window[found, first[found]]
        if not ended.all():  # a run longer than the window
            self._probe_scalar(lanes, idx, rest[~ended], out, PROBE_WINDOW + 1)

    def _probe_scalar(self, lanes: np.ndarray, idx: np.ndarray, rest: np.ndarray, out: np.ndarray, skip: int) -> None:
        table, mask = self._table, int(self._mask)
        empty, free_from = int(EMPTY), int(_FREE_FROM)
        for i, lane, home in zip(rest.tolist(), lanes[rest].tolist(), idx[rest].tolist()):
            pos = (home + skip) & mask
            while True:
                row_lane, _, row_slot, _ = table[pos].tolist()
                if row_lane == lane and row_slot < free_from:
                    out[i] = pos
                    break
                if row_slot == empty:
                    break
                pos = (pos + 1) & mask

    def get(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each ``[n, 2]`` key, :data:`ABSENT`, or :data:`CLASH`."""
        if len(keys) <= _SCALAR_BATCH:
            return np.array([self._get_one(k0, k1) for k0, k1 in keys.tolist()], np.int64)
        table = self._table
        lanes = keys[:, 0]
        idx = np.bitwise_and(lanes.view(np.int64), self._mask_i64)
        rows = np.take(table, idx, axis=0)  # a row gather (much cheaper than table[idx])
        slot = rows[:, _SLOT]
        hit = rows[:, _LANE0] == lanes
        hit &= slot < _FREE_FROM
        out = np.where(hit, slot, EMPTY).view(np.int64)  # EMPTY reads as -1 = ABSENT
        out[hit > (rows[:, _LANE1] == keys[:, 1])] = CLASH
        rest = np.flatnonzero((slot != EMPTY) > hit)  # occupied by another key: probe on
        if len(rest):
            pos = np.full(len(keys), -1, np.int64)
            self._probe_further(lanes, idx, rest, pos)
            far = rest[pos[rest] >= 0]
            far_rows = np.take(table, pos[far], axis=0)
            out[far] = far_rows[:, _SLOT].astype(np.int64)
            out[far[far_rows[:, _LANE1] != keys[far, 1]]] = CLASH
        return out

    def _get_one(self, lane0: int, lane1: int) -> int:
        table, mask = self._table, int(self._mask)
        empty, free_from = int(EMPTY), int(_FREE_FROM)
        pos = lane0 & mask
        while True:
            row_lane0, row_lane1, row_slot, _ = table[pos].tolist()
            if row_lane0 == lane0 and row_slot < free_from:
                return row_slot if row_lane1 == lane1 else CLASH
            if row_slot == empty:
                return ABSENT
            pos = (pos + 1) & mask

    def insert(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Add entries for absent ``[n, 2]`` keys whose first lanes are unique."""
        n = len(keys)
        if not n:
            return
        lanes = keys[:, 0]
        if len(set(lanes.tolist())) != n:
            raise ValueError("KeyIndex.insert: two keys of one batch share their first lane")
        if self._live + self._tombstones + n > len(self._table) // 2:
            self._rebuild(extra=n)
        if n <= _SCALAR_BATCH:
            self._insert_scalar(keys, slots)
            return
        mask = int(self._mask)
        pending = np.arange(n)
        idx = (lanes & self._mask).astype(np.int64)
        table = self._table
        while len(pending):
            free = table[idx, _SLOT] >= _FREE_FROM
            cand, cidx = pending[free], idx[free]
            taken, first = np.unique(cidx, return_index=True)
            winners = cand[first]
            self._tombstones -= int(np.count_nonzero(table[taken, _SLOT] == TOMBSTONE))
            table[taken, _LANE0] = keys[winners, 0]
            table[taken, _LANE1] = keys[winners, 1]
            table[taken, _SLOT] = slots[winners]
            placed = np.zeros(len(pending), bool)
            placed[np.flatnonzero(free)[first]] = True
            pending, idx = pending[~placed], (idx[~placed] + 1) & mask
        self._live += n

    def _insert_scalar(self, keys: np.ndarray, slots: np.ndarray) -> None:
        table, mask = self._table, int(self._mask)
        free_from, tombstone = int(_FREE_FROM), int(TOMBSTONE)
        for (lane0, lane1), slot in zip(keys.tolist(), np.asarray(slots).tolist()):
            pos = lane0 & mask
            while True:
                row_slot = int(table[pos, _SLOT])
                if row_slot >= free_from:
                    self._tombstones -= row_slot == tombstone
                    table[pos, :3] = (lane0, lane1, slot)
                    break
                pos = (pos + 1) & mask
        self._live += len(keys)

    def remove(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Drop the entries ``key -> slot`` that exist (matched on first lane and slot)."""
        pos = self._positions(keys[:, 0])
        ok = pos >= 0
        ok[ok] = self._table[pos[ok], _SLOT] == np.asarray(slots, np.uint64)[ok]
        pos = pos[ok]
        self._table[pos, _SLOT] = TOMBSTONE
        self._live -= len(pos)
        self._tombstones += len(pos)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All live ``([n, 2] keys, [n] slots)``."""
        live = self._table[:, _SLOT] < _FREE_FROM
        return self._table[live, :2].copy(), self._table[live, _SLOT].astype(np.int64)

    def _rebuild(self, extra: int) -> None:
        keys, slots = self.items()
        size = len(self._table)
        while LOAD_FACTOR_INVERSE * (self._live + extra) > size:
            size *= 2
        self._mask = np.uint64(size - 1)
        self._mask_i64 = np.int64(size - 1)
        self._table = self._empty(size)
        self._live = self._tombstones = 0
        self.insert(keys, slots)
