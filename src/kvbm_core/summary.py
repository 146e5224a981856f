"""The leader's periodic summary line, and its per-request decisions at debug level: a plugin of the event hooks.

Registered through the ``kvbm`` entry-point group as ``log_summary`` (``DYN_KVBM_DISABLE_PLUGINS=
log_summary`` turns it off), like the metrics exporter it reads nothing but hook arguments.

- Every ``cache_stats.log_interval_secs`` (``DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS``, Dynamo's 5 s
  by default; 0: never) a timer thread logs one ``info`` line, ``kvbm summary``, when anything
  happened since the last one: host and disk hit rates over the request window (as the metrics),
  per route the blocks moved in the interval and their GB/s (bytes over the summed duration of the
  operations, as ``kvbm bench`` reports), failures, and each tier's fill (blocks readable / slots).
- Each prefix lookup is logged at ``debug`` (``DYN_KVBM_LOG_LEVEL=debug``): tokens requested, and
  matched on the device, in host and in disk.

One pipeline per process is summarised, as one is exported.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from kvbm_core.hookspecs import hookimpl
from kvbm_core.interfaces import TierLevel
from kvbm_core.leader.stats import HitRateWindow
from kvbm_core.logging import get_logger
from kvbm_core.metrics import ONBOARD_ROUTES

log = get_logger("kvbm.summary")


class Summary:
    """Accumulates one interval's events; :meth:`line` returns the fields of the next summary line."""

    def __init__(self, max_requests: int, tier_slots: Mapping[str, int]) -> None:
        self._lock = threading.Lock()
        self._window = HitRateWindow(max_requests)
        self._slots = dict(tier_slots)
        self._fill: dict[str, int] = dict.fromkeys(tier_slots, 0)
        self._reset()

    def _reset(self) -> None:
        self._blocks: dict[str, int] = defaultdict(int)
        self._bytes: dict[str, int] = defaultdict(int)
        self._seconds: dict[str, float] = defaultdict(float)
        self._failures: dict[str, int] = defaultdict(int)
        self._changed = False

    def moved(self, route: str, num_blocks: int, num_bytes: int, seconds: float) -> None:
        with self._lock:
            self._blocks[route] += num_blocks
            self._bytes[route] += num_bytes
            self._seconds[route] += seconds
            self._changed = True

    def failed(self, route: str) -> None:
        with self._lock:
            self._failures[route] += 1
            self._changed = True

    def finished(self, queried: int, host: int, disk: int) -> None:
        with self._lock:
            self._window.add(queried, host, disk)
            self._changed = True

    def filled(self, tier: str, delta: int) -> None:
        with self._lock:
            self._fill[tier] = self._fill.get(tier, 0) + delta
            self._changed = True

    def line(self) -> dict[str, Any] | None:
        """The next line's fields, or None when nothing happened since the last one."""
        with self._lock:
            if not self._changed:
                return None
            fields: dict[str, Any] = {
                "host_hit_rate": round(self._window.host_rate, 4),
                "disk_hit_rate": round(self._window.disk_rate, 4),
            }
            for route in sorted(self._blocks):
                seconds = self._seconds[route]
                gbps = self._bytes[route] / seconds / 1e9 if seconds > 0 else 0.0
                fields[f"{route}_blocks"] = self._blocks[route]
                fields[f"{route}_gbps"] = round(gbps, 2)
            for route in sorted(self._failures):
                fields[f"{route}_failures"] = self._failures[route]
            for tier in sorted(self._fill):
                slots = self._slots.get(tier)
                fields[f"{tier}_fill"] = f"{self._fill[tier]}/{slots}" if slots else self._fill[tier]
            self._reset()
            return fields


class SummaryLogger:
    """A :class:`Summary` and the timer thread that logs it."""

    def __init__(self, summary: Summary, interval_s: float, pipeline: Any) -> None:
        self.summary = summary
        self.pipeline = pipeline
        self._interval_s = interval_s
        self.onboard_routes: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvbm-summary", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the timer; what happened since the last line is logged now."""
        self._stop.set()
        self._thread.join(5)
        self.log_once()

    def log_once(self) -> None:
        fields = self.summary.line()
        if fields is not None:
            log.info("kvbm summary", **fields)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.log_once()


def _tiers(pipeline: Any) -> tuple[dict[str, int], dict[str, str]]:
    """Each tier's slots, and the route an onboard from it takes (``h2d`` or ``disk2h``)."""
    tiers: Iterable[Any] = getattr(pipeline, "tiers", ())
    if isinstance(tiers, Mapping):
        tiers = tiers.values()
    slots, routes = {}, {}
    for tier in tiers:
        name = getattr(tier, "kind", None) or getattr(tier, "name")
        count = getattr(tier, "num_slots", None)
        slots[name] = int(count) if count is not None else 0
        routes[name] = ONBOARD_ROUTES.get(TierLevel(tier.level), f"{name}2d")
    return slots, routes


# ------------------------------------------------------------------------------------- hooks
_active: SummaryLogger | None = None
_active_lock = threading.Lock()


def active_summary() -> SummaryLogger | None:
    """The summary of the pipeline being summarised in this process, if any."""
    return _active


@hookimpl
def kvbm_pipeline_built(pipeline: Any) -> None:
    global _active
    interval = pipeline.settings.cache_stats.log_interval_secs
    with _active_lock:
        if interval <= 0 or _active is not None:
            return
        slots, routes = _tiers(pipeline)
        _active = SummaryLogger(Summary(pipeline.settings.cache_stats.max_requests, slots), interval, pipeline)
        _active.onboard_routes = routes
        _active.start()


@hookimpl
def kvbm_pipeline_closed(pipeline: Any) -> None:
    global _active
    with _active_lock:
        if _active is None or _active.pipeline is not pipeline:
            return
        _active.stop()
        _active = None


@hookimpl
def kvbm_request_matched(request_id: int, requested_tokens: int, device_tokens: int, host_tokens: int, disk_tokens: int) -> None:
    log.debug("prefix lookup", request_id=request_id, requested=requested_tokens, device=device_tokens, host=host_tokens, disk=disk_tokens)


@hookimpl
def kvbm_request_finished(request_id: int, queried_blocks: int, host_hit_blocks: int, disk_hit_blocks: int) -> None:
    if _active is not None:
        _active.summary.finished(queried_blocks, host_hit_blocks, disk_hit_blocks)


@hookimpl
def kvbm_blocks_offloaded(route: str, num_blocks: int, num_bytes: int, seconds: float) -> None:
    if _active is not None:
        _active.summary.moved(route, num_blocks, num_bytes, seconds)


@hookimpl
def kvbm_blocks_onboarded(tier: str, request_id: int, num_blocks: int, num_bytes: int, seconds: float) -> None:
    if _active is not None:
        _active.summary.moved(_active.onboard_routes.get(tier, f"{tier}2d"), num_blocks, num_bytes, seconds)


@hookimpl
def kvbm_transfer_failed(route: str, op_id: int, request_id: int, error: str) -> None:
    if _active is not None:
        _active.summary.failed(route)


@hookimpl
def kvbm_blocks_stored(tier: str, route: str, keys: np.ndarray, seq_hashes: np.ndarray) -> None:
    if _active is not None:
        _active.summary.filled(tier, len(keys))


@hookimpl
def kvbm_blocks_removed(tier: str, keys: np.ndarray, seq_hashes: np.ndarray) -> None:
    if _active is not None:
        _active.summary.filled(tier, -len(keys))
