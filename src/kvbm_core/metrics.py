"""The Prometheus exporter: a plugin of the event hooks, serving ``/metrics`` on the leader.

Registered by :mod:`kvbm_core.builtin`. When ``settings.metrics.enabled`` (``DYN_KVBM_METRICS``),
``kvbm_pipeline_built`` starts an HTTP server on ``0.0.0.0:settings.metrics.port``
(``DYN_KVBM_METRICS_PORT``, 6880) with a private ``CollectorRegistry``; ``kvbm_pipeline_closed``
stops it. One pipeline per process is exported; a second one built while the first is open is not.

Names are exactly Dynamo's, so its Grafana dashboard works unchanged:

=============================  =================================================================
``kvbm_matched_tokens``        tokens the tiers below the GPU matched (host + disk)
``kvbm_offload_blocks_d2h``    blocks offloaded device -> host (route ``d2h``)
``kvbm_offload_blocks_h2d``    blocks offloaded host -> **disk** (route ``h2disk``; Dynamo's name)
``kvbm_offload_blocks_d2d``    blocks offloaded device -> disk (``d2disk``: blocks the host had
                               no room for)
``kvbm_onboard_blocks_h2d``    blocks onboarded from the host tier (route ``h2d``)
``kvbm_onboard_blocks_d2d``    blocks onboarded from the disk tier (staged ``disk2h``, then copied)
``kvbm_host_cache_hit_rate``   host hits / blocks queried over the last N finished requests
``kvbm_disk_cache_hit_rate``   disk hits / blocks queried over the same window
=============================  =================================================================

Dynamo's Rust exporter emits its counters without the ``_total`` suffix. prometheus-client always
appends ``_total`` to a Counter, so kvbm's counts are **Gauge-typed metrics that only ever
increase**: the sample names are exactly the ones above in both the Prometheus text and the
OpenMetrics formats, and PromQL's ``rate()``/``increase()`` work on them as on counters (a
restart resets them to 0, which ``rate()`` handles as a counter reset).

Added by kvbm, same convention: ``kvbm_requested_tokens`` (prompt tokens looked up),
``kvbm_transfer_blocks{route}``, ``kvbm_transfer_bytes{route}``, ``kvbm_transfer_failures{route}``,
the histogram ``kvbm_transfer_seconds{route}``, ``kvbm_tier_blocks{tier}`` (blocks readable now) and
``kvbm_tier_capacity_blocks{tier}`` (slots per rank). Routes are :class:`kvbm_core.ops.Route` labels.

A port that cannot be bound is logged as an error naming ``DYN_KVBM_METRICS_PORT`` and the engine
keeps serving without metrics: losing the dashboard must not take inference down.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

from kvbm_core.errors import ConfigError
from kvbm_core.hookspecs import hookimpl
from kvbm_core.interfaces import TierLevel
from kvbm_core.leader.stats import HitRateWindow
from kvbm_core.logging import get_logger
from kvbm_core.ops import Route

PORT_VARIABLE = "DYN_KVBM_METRICS_PORT"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Route label -> Dynamo's metric name (note h2disk -> "h2d" and disk2d -> "d2d", as Dynamo names them).
OFFLOAD_NAMES: Mapping[str, str] = {
    Route.D2H.label: "kvbm_offload_blocks_d2h",
    Route.H2DISK.label: "kvbm_offload_blocks_h2d",
    Route.D2DISK.label: "kvbm_offload_blocks_d2d",
}
ONBOARD_NAMES: Mapping[TierLevel, tuple[str, str]] = {
    TierLevel.HOST: (Route.H2D.label, "kvbm_onboard_blocks_h2d"),
    TierLevel.DISK: (Route.DISK2H.label, "kvbm_onboard_blocks_d2d"),
}

log = get_logger("kvbm.metrics")


class KvbmMetrics:
    """Every metric family in one private registry, updated from the event hooks' arguments."""

    def __init__(self, max_requests: int, tier_levels: Mapping[str, TierLevel], tier_slots: Mapping[str, int] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self._tier_levels = dict(tier_levels)
        self._window = HitRateWindow(max_requests)
        self._lock = threading.Lock()
        r = self.registry
        self.matched_tokens = Gauge("kvbm_matched_tokens", "Tokens matched in host and disk tiers", registry=r)
        self.requested_tokens = Gauge("kvbm_requested_tokens", "Prompt tokens looked up in the tiers", registry=r)
        self.offload_blocks = {label: Gauge(name, f"Blocks offloaded along {label}", registry=r) for label, name in OFFLOAD_NAMES.items()}
        self.onboard_blocks = {
            level: Gauge(name, f"Blocks onboarded along {label}", registry=r) for level, (label, name) in ONBOARD_NAMES.items()
        }
        self.host_hit_rate = Gauge("kvbm_host_cache_hit_rate", "Host cache hit rate (0-1) over the request window", registry=r)
        self.disk_hit_rate = Gauge("kvbm_disk_cache_hit_rate", "Disk cache hit rate (0-1) over the request window", registry=r)
        self.transfer_blocks = Gauge("kvbm_transfer_blocks", "Blocks moved, by route", ["route"], registry=r)
        self.transfer_bytes = Gauge("kvbm_transfer_bytes", "Bytes moved, by route", ["route"], registry=r)
        self.transfer_failures = Gauge("kvbm_transfer_failures", "Failed transfer operations, by route", ["route"], registry=r)
        self.transfer_seconds = Histogram(
            "kvbm_transfer_seconds", "Duration of one transfer operation, by route", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.tier_blocks = Gauge("kvbm_tier_blocks", "Blocks readable in the tier", ["tier"], registry=r)
        self.tier_capacity = Gauge("kvbm_tier_capacity_blocks", "Slots of the tier per rank", ["tier"], registry=r)
        for tier, slots in (tier_slots or {}).items():
            self.tier_capacity.labels(tier).set(slots)
            self.tier_blocks.labels(tier).set(0)

    # --------------------------------------------------------------------------- event updates
    def request_matched(self, requested_tokens: int, host_tokens: int, disk_tokens: int) -> None:
        self.requested_tokens.inc(requested_tokens)
        self.matched_tokens.inc(host_tokens + disk_tokens)

    def request_finished(self, queried_blocks: int, host_hit_blocks: int, disk_hit_blocks: int) -> None:
        with self._lock:
            self._window.add(queried_blocks, host_hit_blocks, disk_hit_blocks)
            self.host_hit_rate.set(self._window.host_rate)
            self.disk_hit_rate.set(self._window.disk_rate)

    def offloaded(self, route: str, num_blocks: int, num_bytes: int, seconds: float) -> None:
        seed = self.offload_blocks.get(route)
        if seed is not None:
            seed.inc(num_blocks)
        self._transfer(route, num_blocks, num_bytes, seconds)

    def onboarded(self, tier: str, num_blocks: int, num_bytes: int, seconds: float) -> None:
        level = self._tier_levels.get(tier)
        if level not in ONBOARD_NAMES:
            log.warning("onboard from a tier of unknown level", tier=tier)
            self._transfer(f"{tier}2d", num_blocks, num_bytes, seconds)
            return
        label, _ = ONBOARD_NAMES[level]
        self.onboard_blocks[level].inc(num_blocks)
        self._transfer(label, num_blocks, num_bytes, seconds)

    def failed(self, route: str) -> None:
        self.transfer_failures.labels(route).inc()

    def stored(self, tier: str, count: int) -> None:
        self.tier_blocks.labels(tier).inc(count)

    def removed(self, tier: str, count: int) -> None:
        self.tier_blocks.labels(tier).dec(count)

    def _transfer(self, route: str, num_blocks: int, num_bytes: int, seconds: float) -> None:
        self.transfer_blocks.labels(route).inc(num_blocks)
        self.transfer_bytes.labels(route).inc(num_bytes)
        self.transfer_seconds.labels(route).observe(seconds)


class MetricsExporter:
    """:class:`KvbmMetrics` plus the HTTP server that serves them."""

    def __init__(self, metrics: KvbmMetrics, pipeline: Any = None) -> None:
        self.metrics = metrics
        self.pipeline = pipeline
        self.port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Start serving ``/metrics``; a :class:`ConfigError` naming ``DYN_KVBM_METRICS_PORT`` if it cannot bind."""
        try:
            self._server, self._thread = start_http_server(port, addr, registry=self.metrics.registry)
        except OSError as exc:
            raise ConfigError(PORT_VARIABLE, f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}", "a free TCP port") from None
        self.port = self._server.server_port
        log.info("serving metrics", address=f"http://{addr}:{self.port}/metrics")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(5)
            self._server = self._thread = None


def exporter_for(pipeline: Any) -> MetricsExporter:
    """Build (not start) the exporter for a pipeline exposing ``settings`` and ``tiers``."""
    levels, slots = {}, {}
    for tier in _tiers(pipeline):
        name = getattr(tier, "kind", None) or getattr(tier, "name")
        levels[name] = TierLevel(tier.level)
        if getattr(tier, "num_slots", None) is not None:
            slots[name] = int(tier.num_slots)
    return MetricsExporter(KvbmMetrics(pipeline.settings.cache_stats.max_requests, levels, slots), pipeline)


def _tiers(pipeline: Any) -> Iterable[Any]:
    tiers = getattr(pipeline, "tiers", ())
    return tiers.values() if isinstance(tiers, Mapping) else tiers


# ------------------------------------------------------------------------------------- hooks
_active: MetricsExporter | None = None
_active_lock = threading.Lock()


def active_exporter() -> MetricsExporter | None:
    """The exporter of the pipeline being exported in this process, if any."""
    return _active


@hookimpl
def kvbm_pipeline_built(pipeline: Any) -> None:
    global _active
    if not pipeline.settings.metrics.enabled:
        return
    with _active_lock:
        if _active is not None:
            log.warning("metrics already exported for another pipeline in this process; not exporting this one")
            return
        exporter = exporter_for(pipeline)
        try:
            exporter.serve(pipeline.settings.metrics.port)
        except ConfigError as exc:
            log.error("metrics disabled, serving continues", error=str(exc))
        _active = exporter


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
    if _active is not None:
        _active.metrics.request_matched(requested_tokens, host_tokens, disk_tokens)


@hookimpl
def kvbm_request_finished(request_id: int, queried_blocks: int, host_hit_blocks: int, disk_hit_blocks: int) -> None:
    if _active is not None:
        _active.metrics.request_finished(queried_blocks, host_hit_blocks, disk_hit_blocks)


@hookimpl
def kvbm_blocks_offloaded(route: str, num_blocks: int, num_bytes: int, seconds: float) -> None:
    if _active is not None:
        _active.metrics.offloaded(route, num_blocks, num_bytes, seconds)


@hookimpl
def kvbm_blocks_onboarded(tier: str, request_id: int, num_blocks: int, num_bytes: int, seconds: float) -> None:
    if _active is not None:
        _active.metrics.onboarded(tier, num_blocks, num_bytes, seconds)


@hookimpl
def kvbm_transfer_failed(route: str, op_id: int, request_id: int, error: str) -> None:
    if _active is not None:
        _active.metrics.failed(route)


@hookimpl
def kvbm_blocks_stored(tier: str, route: str, keys: np.ndarray, seq_hashes: np.ndarray) -> None:
    if _active is not None:
        _active.metrics.stored(tier, len(keys))


@hookimpl
def kvbm_blocks_removed(tier: str, keys: np.ndarray, seq_hashes: np.ndarray) -> None:
    if _active is not None:
        _active.metrics.removed(tier, len(keys))
