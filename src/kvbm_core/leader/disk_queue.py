"""Host blocks admitted for the background host -> disk route, waiting for room in flight.

The queue holds keys, not slots: by the time the route has room, a queued block may have been
evicted from the host (it is then dropped) or may already be on disk (skipped), which the block
manager checks when it plans. Keys are unique in the queue; the oldest are dropped beyond
``capacity`` (the host tier's slot count, since nothing older can still be in the host).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class DiskOffloadQueue:
    """FIFO of unique ``[2]`` uint64 keys."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 1)
        self._keys: OrderedDict[tuple[int, int], None] = OrderedDict()

    def push(self, keys: np.ndarray) -> None:
        queue = self._keys
        for k0, k1 in keys.tolist():
            queue[(k0, k1)] = None
        while len(queue) > self.capacity:
            queue.popitem(last=False)

    def take(self, n: int) -> np.ndarray:
        """Remove and return up to ``n`` of the oldest keys as an ``[m, 2]`` uint64 array."""
        queue = self._keys
        out = [queue.popitem(last=False)[0] for _ in range(min(n, len(queue)))]
        return np.array(out, np.uint64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self._keys)
