"""The leader's KV-event publisher: router events (:mod:`.router_events`) over NATS, from its own thread.

**On the leader's thread** (:meth:`KvEventPublisher.stored` / :meth:`~KvEventPublisher.removed`,
called from the event hooks) a change is one copy of the hook's hash array appended to a bounded
queue, under a lock the publisher thread takes only to swap the queue out: no per-block work, no
encoding, no I/O, no wait. When ``queue_size`` changes are already waiting, the queue is full: the
changes that follow go to an overflow record instead (net state per block and tier, until the
publisher thread takes it), counted in ``kvbm_kv_events_dropped_blocks_total``: they are not
published as events, and a resynchronisation follows. So the publisher's view of the tiers stays
exact even when events are dropped.

**On the publisher's thread** (``kvbm-kv-events``, its own asyncio loop) every ``flush_interval_s``
the queue (and any overflow record) is taken whole and applied to the publisher's record of which
sequence hashes each tier holds; consecutive changes of one tier are merged, stored blocks are
grouped into chains (parents and local hashes from :mod:`.lineage`), and each event is published as
one message on ``subject``; then the connection is flushed once.

**Resynchronisation** publishes ``cleared``, then ``stored`` for every block the record holds, from
the publisher's thread after it applied every change taken so far (later changes follow it in
order). It happens on every connect and reconnect (what was published while the server was away is
lost), after an overflow, when any message arrives on ``<subject>.resync`` (a subscriber that has
just (re)connected asks for one), and every ``resync_interval_s`` for subscribers that cannot ask
(0: never).

**An unreachable server** is retried forever by the client, in the background. The publisher logs
one warning when it loses the server (or never reaches it) and one line when it is back; changes
meanwhile are recorded, not published (the resynchronisation covers them).

**Close** publishes what is queued and a final ``cleared`` (this instance holds nothing any more),
and disconnects, within ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvbm_core.cluster import router_events
from kvbm_core.cluster.lineage import PendingLineage
from kvbm_core.cluster.router_events import Lineage
from kvbm_core.logging import get_logger
from kvbm_core.transports.loop import BackgroundLoop
from kvbm_core.transports.nats import NatsOptions, import_client
from kvbm_core.transports.options import reason

log = get_logger("kvbm.kv_events")

STORED, REMOVED = "stored", "removed"
_MAX_REMOVED_PER_EVENT = 16_384  # 16k hashes of 20 digits: well under NATS' 1 MB payload


def random_worker_id() -> int:
    """A router worker id for an instance that was not given one: 63 random bits, never 0."""
    return random.SystemRandom().randrange(1, 2**63)


@dataclass
class PublisherCounts:
    """What the publisher did (read by :class:`KvEventsCollector`)."""

    published_events: int = 0
    dropped_blocks: int = 0
    resyncs: int = 0
    unannounced_blocks: int = 0  # stored blocks whose lineage was unknown (never announced)


Change = tuple[str, str, np.ndarray]
"""``(STORED or REMOVED, tier kind, sequence hashes)`` as the hook passed them."""


class KvEventPublisher:
    """Publishes the leader's tier changes as router events (see the module docstring)."""

    def __init__(self, options: NatsOptions, worker_id: int, tier_levels: Mapping[str, int],
                 pending: PendingLineage) -> None:
        self.options = options
        self.events = options.kv_events
        self.subject = self.events.subject
        self.worker_id = worker_id
        self.counts = PublisherCounts()
        self._storage_tiers = {kind: router_events.storage_tier(level) for kind, level in tier_levels.items()}
        self._lock = threading.Lock()
        self._queue: deque[Change] = deque()
        self._overflow: dict[str, dict[int, bool]] | None = None  # tier -> {hash: held}, while the queue is full
        self._resync_wanted = True
        self._pending = pending
        # Publisher thread only: what each tier holds, and the lineage of those blocks.
        self._held: dict[str, set[int]] = {kind: set() for kind in tier_levels}
        self._known: dict[int, Lineage] = {}
        self._event_id = 0
        self._nc: Any = None
        self.connected = False
        self._down_reported = False
        self._last_resync = 0.0
        self._loop: BackgroundLoop | None = None
        self._stop: asyncio.Event | None = None
        self._runner: Any = None

    # ------------------------------------------------------------------- the leader's thread
    def stored(self, tier: str, seq_hashes: np.ndarray) -> None:
        self._change(STORED, tier, seq_hashes)

    def removed(self, tier: str, seq_hashes: np.ndarray) -> None:
        self._change(REMOVED, tier, seq_hashes)

    def _change(self, kind: str, tier: str, seq_hashes: np.ndarray) -> None:
        if not len(seq_hashes):
            return
        with self._lock:
            if self._overflow is None and len(self._queue) < self.events.queue_size:
                self._queue.append((kind, tier, seq_hashes.copy()))
                return
            if self._overflow is None:
                self._overflow = {}
            held = kind == STORED
            self._overflow.setdefault(tier, {}).update(dict.fromkeys(seq_hashes.tolist(), held))
            self.counts.dropped_blocks += len(seq_hashes)

    # ------------------------------------------------------------------------------- lifetime
    def start(self) -> None:
        import_client(self.options)  # a missing client library is a TransportError here, not in the thread
        self._loop = BackgroundLoop("kvbm-kv-events")
        self._runner = asyncio.run_coroutine_threadsafe(self._run(), self._loop.loop)

    def close(self) -> None:
        """Publish what is queued and a final ``cleared``, disconnect; bounded by ``timeout_s``."""
        if self._loop is None or self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._shutdown(), self.options.timeout_s)
        except Exception as exc:  # a dead server must not stop shutdown
            log.warning("kv events: close did not finish", error=reason(exc))
        finally:
            self._loop.stop()

    # ----------------------------------------------------------------------- publisher thread
    async def _run(self) -> None:
        self._stop = asyncio.Event()
        connecting = asyncio.create_task(self._connect())
        try:
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), self.events.flush_interval_s)
                except asyncio.TimeoutError:
                    pass
                await self._tick()
        finally:
            connecting.cancel()

    async def _tick(self) -> None:
        with self._lock:
            changes = list(self._queue)
            self._queue.clear()
            overflow, self._overflow = self._overflow, None
        self._pending.absorb()
        publish = self.connected and not self._resync_wanted and overflow is None
        await self._apply(changes, publish)
        if overflow is not None:
            self._apply_overflow(overflow)
            self._resync_wanted = True
        due = self.events.resync_interval_s > 0 and time.monotonic() - self._last_resync >= self.events.resync_interval_s
        if self.connected and (self._resync_wanted or due):
            await self._resync()

    async def _apply(self, changes: list[Change], publish: bool) -> None:
        """Update the record (learning the lineage of stored blocks, forgetting that of blocks no
        tier holds), and publish the changes as events when ``publish``."""
        out: list[bytes] = []
        for kind, tier, hashes in _merged(changes):
            held = self._held_in(tier)
            if kind == STORED:
                runs, missing = router_events.chains(hashes, self._lineage)
                self.counts.unannounced_blocks += missing
                held.update(h for _, blocks in runs for h, _ in blocks)
                if publish:
                    out += self._stored_events(tier, runs)
            else:
                held.difference_update(hashes)
                self._forget(hashes)
                if publish:
                    for start in range(0, len(hashes), _MAX_REMOVED_PER_EVENT):
                        out.append(router_events.removed(self.worker_id, self._next_id(), self._storage_tiers[tier],
                                                         hashes[start : start + _MAX_REMOVED_PER_EVENT]))
        if out:
            await self._publish(out)

    def _apply_overflow(self, overflow: dict[str, dict[int, bool]]) -> None:
        for tier, states in overflow.items():
            added = [h for h, present in states.items() if present and h]
            gone = [h for h, present in states.items() if not present]
            runs, missing = router_events.chains(added, self._lineage)
            self.counts.unannounced_blocks += missing
            held = self._held_in(tier)
            held.update(h for _, blocks in runs for h, _ in blocks)
            held.difference_update(gone)
            self._forget(gone)

    async def _resync(self) -> None:
        self._resync_wanted = False
        out = [router_events.cleared(self.worker_id, self._next_id())]
        for tier, hashes in self._held.items():
            runs, missing = router_events.chains(hashes, self._lineage)
            out += self._stored_events(tier, runs)
        self.counts.resyncs += 1
        self._last_resync = time.monotonic()
        log.debug("kv events: resynchronised", blocks=sum(map(len, self._held.values())), events=len(out))
        await self._publish(out)

    def _held_in(self, tier: str) -> set[int]:
        found = self._held.get(tier)
        if found is None:  # a tier the pipeline did not list (none today): published as external
            found = self._held[tier] = set()
            self._storage_tiers.setdefault(tier, router_events.EXTERNAL)
        return found

    def _stored_events(self, tier: str, runs: list[router_events.Run]) -> list[bytes]:
        name = self._storage_tiers[tier]
        return [router_events.stored(self.worker_id, self._next_id(), name, parent, blocks)
                for parent, blocks in router_events.split(runs, self.events.max_blocks_per_event)]

    def _lineage(self, sequence_hash: int) -> Lineage | None:
        found = self._known.get(sequence_hash)
        if found is None:
            found = self._pending.get(sequence_hash)
            if found is not None:
                self._known[sequence_hash] = found
        return found

    def _forget(self, hashes: list[int]) -> None:
        """Drop the lineage of blocks no tier holds any more."""
        tiers = list(self._held.values())
        known = self._known
        for h in hashes:
            if not any(h in held for held in tiers):
                known.pop(h, None)

    def _next_id(self) -> int:
        self._event_id += 1
        return self._event_id

    async def _publish(self, payloads: list[bytes]) -> None:
        nc = self._nc
        try:
            for payload in payloads:
                await nc.publish(self.subject, payload)
                self.counts.published_events += 1
            await nc.flush(timeout=self.options.timeout_s)
        except Exception as exc:  # the connection broke: the reconnect resynchronises
            self._resync_wanted = True
            log.debug("kv events: publish interrupted", error=reason(exc))

    # -------------------------------------------------------------------------- connection
    async def _connect(self) -> None:
        nats = import_client(self.options)

        async def on_error(exc: Exception) -> None:
            if not self.connected:
                self._report_down(reason(exc))

        async def on_disconnected() -> None:
            self.connected = False
            self._resync_wanted = True
            if self._stop is None or not self._stop.is_set():  # not the close of our own connection
                self._report_down("connection lost")

        async def on_reconnected() -> None:
            self._on_connected()

        async def on_resync_request(msg: Any) -> None:
            self._resync_wanted = True

        try:
            self._nc = await nats.connect(
                servers=list(self.options.servers),
                name=f"kvbm-{self.worker_id:x}",
                connect_timeout=max(1, int(self.options.timeout_s)),
                allow_reconnect=True,
                max_reconnect_attempts=-1,  # the first connect, too, is retried until the server answers
                reconnect_time_wait=1,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
            )
            await self._nc.subscribe(f"{self.subject}.resync", cb=on_resync_request)  # renewed on reconnect
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # not a connection failure (those are retried): nothing will be published
            log.error("kv events disabled, serving continues", servers=", ".join(self.options.servers),
                      error=reason(exc))
            return
        self._on_connected()

    def _on_connected(self) -> None:
        self.connected = True
        self._resync_wanted = True
        url = self._nc.connected_url
        server = f"{url.scheme}://{url.hostname}:{url.port}" if url else ", ".join(self.options.servers)
        log.info("kv events: publishing", server=server, subject=self.subject, worker_id=self.worker_id,
                 again=self._down_reported)
        self._down_reported = False

    def _report_down(self, why: str) -> None:
        if not self._down_reported:
            self._down_reported = True
            log.warning("kv events: NATS server unreachable; the engine serves on, events resume (every held "
                        "block re-sent) when it answers", servers=", ".join(self.options.servers), error=why)

    async def _shutdown(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._runner is not None:
            await asyncio.wrap_future(self._runner)
        if self.connected:
            await self._tick()
            await self._publish([router_events.cleared(self.worker_id, self._next_id())])
        if self._nc is not None:
            await self._nc.close()


def _merged(changes: list[Change]) -> Iterator[tuple[str, str, list[int]]]:
    """Consecutive changes of the same kind and tier as one list of hashes, without the 0s of
    blocks whose tokens are unknown (the order between the others is kept)."""
    kind = tier = None
    hashes: list[int] = []
    for k, t, h in changes:
        if (k, t) != (kind, tier):
            if hashes:
                yield kind, tier, hashes  # type: ignore[misc]
            kind, tier, hashes = k, t, []
        hashes.extend(h[h != 0].tolist() if not h.all() else h.tolist())
    if hashes:
        yield kind, tier, hashes  # type: ignore[misc]


class KvEventsCollector(Collector):
    """The publisher's counts as Prometheus series, in the metrics exporter's registry.

    ``kvbm_kv_events_published_total`` (events), ``kvbm_kv_events_dropped_blocks_total`` (block
    changes dropped on a full queue, each followed by a resynchronisation),
    ``kvbm_kv_events_resyncs_total``, ``kvbm_kv_events_unannounced_blocks_total`` (stored blocks whose
    parent and token hash were not known) and the gauge ``kvbm_kv_events_connected`` (1 or 0).
    """

    def __init__(self, publisher: KvEventPublisher) -> None:
        self._publisher = publisher

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        counts = self._publisher.counts
        yield CounterMetricFamily("kvbm_kv_events_published", "KV events published on NATS",
                                  value=counts.published_events)
        yield CounterMetricFamily("kvbm_kv_events_dropped_blocks", "Block changes dropped because the KV-event "
                                  "queue was full (a resynchronisation follows)", value=counts.dropped_blocks)
        yield CounterMetricFamily("kvbm_kv_events_resyncs", "Resynchronisations (cleared, then every held block)",
                                  value=counts.resyncs)
        yield CounterMetricFamily("kvbm_kv_events_unannounced_blocks", "Stored blocks not announced: their "
                                  "parent and token hash were unknown", value=counts.unannounced_blocks)
        yield GaugeMetricFamily("kvbm_kv_events_connected", "1 while connected to a NATS server",
                                value=1.0 if self._publisher.connected else 0.0)

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        return self.collect()
