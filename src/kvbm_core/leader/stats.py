"""The leader's accounting behind the seed metrics (and a few more), read through ``BlockManager.stats``.

- ``matched_tokens``: tokens promised to the engine (``get_num_new_matched_tokens`` answers);
  ``requested_tokens``: prompt tokens of every matched request (so a token hit rate exists, which
  Dynamo lacks).
- Blocks per route count **completed** operations only: a failed operation is never counted as
  done (Dynamo counts offloads when it plans them).
- Host and disk hit rates are block-weighted over the last ``cache_stats.max_requests`` finished
  requests: per request the blocks looked up (prompt blocks beyond the device-cached prefix that
  could be promised, i.e. up to ``floor((prompt_len - 1) / tokens_per_block)``) and the blocks
  promised from each tier. A request that never looked up (no match call, or a device match that
  is not block-aligned) does not enter the window.

Exporters do not read this object: they subscribe to the event hooks the manager fires.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvbm_core.ops import Route


@dataclass(frozen=True)
class LeaderStats:
    """A snapshot of the accounting."""

    matched_tokens: int
    requested_tokens: int
    blocks: dict[Route, int] = field(default_factory=dict)
    host_hit_rate: float = 0.0
    disk_hit_rate: float = 0.0
    failed_ops: int = 0
    window_requests: int = 0
    declined_blocks: dict[str, int] = field(default_factory=dict)  # per tier kind: matched, not worth loading

    @property
    def offload_blocks_d2h(self) -> int:
        return self.blocks.get(Route.D2H, 0)

    @property
    def offload_blocks_h2disk(self) -> int:
        return self.blocks.get(Route.H2DISK, 0)

    @property
    def offload_blocks_d2disk(self) -> int:
        """Blocks stored straight to disk because the host had no room for them."""
        return self.blocks.get(Route.D2DISK, 0)

    @property
    def onboard_blocks_h2d(self) -> int:
        """Blocks copied host -> device (disk blocks count here too, after their staging)."""
        return self.blocks.get(Route.H2D, 0)

    @property
    def staged_blocks_disk2h(self) -> int:
        """Disk blocks read, verified and copied into the host for a promise."""
        return self.blocks.get(Route.DISK2H, 0)


class HitRateWindow:
    """Block-weighted host/disk hit rates over the last ``max_requests`` requests (running sums)."""

    def __init__(self, max_requests: int) -> None:
        self._entries: deque[tuple[int, int, int]] = deque()
        self._max = max_requests
        self.queried = self.host = self.disk = 0

    def add(self, queried: int, host: int, disk: int) -> None:
        self._entries.append((queried, host, disk))
        self.queried += queried
        self.host += host
        self.disk += disk
        if len(self._entries) > self._max:
            q, h, d = self._entries.popleft()
            self.queried -= q
            self.host -= h
            self.disk -= d

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def host_rate(self) -> float:
        return self.host / self.queried if self.queried else 0.0

    @property
    def disk_rate(self) -> float:
        return self.disk / self.queried if self.queried else 0.0


class StatsBook:
    """The mutable counters the manager updates; :meth:`snapshot` freezes them."""

    def __init__(self, max_requests: int) -> None:
        self.matched_tokens = 0
        self.requested_tokens = 0
        self.blocks: dict[Route, int] = {r: 0 for r in Route}
        self.failed_ops = 0
        self.declined: dict[str, int] = {}  # tier kind -> matched blocks not promised (cost model)
        self.window = HitRateWindow(max_requests)

    def snapshot(self) -> LeaderStats:
        return LeaderStats(
            matched_tokens=self.matched_tokens,
            requested_tokens=self.requested_tokens,
            blocks=dict(self.blocks),
            host_hit_rate=self.window.host_rate,
            disk_hit_rate=self.window.disk_rate,
            failed_ops=self.failed_ops,
            window_requests=len(self.window),
            declined_blocks=dict(self.declined),
        )
