"""The Prometheus exporter: a plugin of the event hooks, serving ``/metrics`` on the leader.

Registered by :mod:`kvbm_core.builtin`. When ``settings.metrics.enabled`` (``DYN_KVBM_METRICS``),
``kvbm_pipeline_built`` starts an HTTP server on ``settings.metrics.host`` (``DYN_KVBM_METRICS_HOST``,
all interfaces by default) and ``settings.metrics.port`` (``DYN_KVBM_METRICS_PORT``, 6880) with a
private ``CollectorRegistry``; ``kvbm_pipeline_closed`` stops it. One pipeline per process is
exported; a second one built while the first is open is not.

**kvbm's own series follow Prometheus' conventions**: every count is a Counter (its sample ends in
``_total``), every series of every route and tier exists from the start at 0, so a panel shows 0,
not "No data", until something happens:

=========================================  =======================================================
``kvbm_requested_tokens_total``            prompt tokens looked up in the tiers
``kvbm_matched_tokens_by_level_total``     tokens matched, ``{level="host"|"disk"}``
``kvbm_transfer_blocks_total{route}``      blocks moved along a route (``d2h``, ``h2d``, ``h2disk``,
                                           ``disk2h``, ``d2disk``: :class:`kvbm_core.ops.Route`)
``kvbm_transfer_bytes_total{route}``       bytes moved along a route
``kvbm_transfer_failures_total{route}``    failed operations along a route
``kvbm_transfer_seconds{route}``           histogram: duration of one operation
``kvbm_host_cache_hit_rate``, ``kvbm_disk_cache_hit_rate``  gauges: hits / blocks queried over the
                                           last ``cache_stats.max_requests`` finished requests
``kvbm_tier_blocks{tier}``                 gauge: blocks readable in a tier now
``kvbm_tier_capacity_blocks{tier}``        gauge: slots of the tier per rank
=========================================  =======================================================

**The names of the seed guide and of Dynamo's dashboard are served too**, computed at scrape time
from the same counts (:class:`CompatibilityCollector`): the seed guide's ``kvbm_matched_tokens``,
``kvbm_offload_blocks_{d2h,h2d,d2d}`` and ``kvbm_onboard_blocks_{h2d,d2d}`` (Dynamo's exporter names:
``h2d`` offload is host -> **disk**, ``d2d`` offload is device -> disk (blocks the host had no room
for), ``d2d`` onboard counts the blocks that came from the disk, staged through the host), and the same six plus the two hit
rates with the ``dynamo_`` prefix that Dynamo's Grafana dashboard
(``deploy/observability/grafana_dashboards/kvbm.json``) queries. Dynamo's exporter serves its counts
without ``_total``, which a Prometheus Counter cannot be (prometheus-client appends ``_total``, and
OpenMetrics requires it), so these views are gauge-typed series that only go up: ``rate()`` and
``increase()`` work on them as on counters.

A port or address that cannot be bound is logged as an error naming ``DYN_KVBM_METRICS_PORT`` and the
engine keeps serving without metrics: losing the dashboard must not take inference down.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kvbm_core.errors import ConfigError
from kvbm_core.hookspecs import hookimpl
from kvbm_core.interfaces import TierLevel
from kvbm_core.leader.stats import HitRateWindow
from kvbm_core.logging import get_logger
from kvbm_core.ops import Route

PORT_VARIABLE = "DYN_KVBM_METRICS_PORT"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROUTES = tuple(r.label for r in Route)
LEVELS = {TierLevel.HOST: "host", TierLevel.DISK: "disk"}

# The seed guide's (and Dynamo's exporter's) names of the block counts, by route.
OFFLOAD_NAMES: Mapping[str, str] = {
    Route.D2H.label: "kvbm_offload_blocks_d2h",
    Route.H2DISK.label: "kvbm_offload_blocks_h2d",
    Route.D2DISK.label: "kvbm_offload_blocks_d2d",
}
ONBOARD_NAMES: Mapping[str, str] = {
    Route.H2D.label: "kvbm_onboard_blocks_h2d",
    Route.DISK2H.label: "kvbm_onboard_blocks_d2d",
}
ONBOARD_ROUTES: Mapping[TierLevel, str] = {TierLevel.HOST: Route.H2D.label, TierLevel.DISK: Route.DISK2H.label}
"""Where a tier's onboarded blocks are counted: a disk block is staged (``disk2h``), then copied."""
DYNAMO_PREFIX = "dynamo_"
"""Dynamo's Grafana dashboard queries ``dynamo_kvbm_<name>`` for each seed name."""

log = get_logger("kvbm.metrics")


class KvbmMetrics:
    """Every metric family in one private registry, updated from the event hooks' arguments."""

    def __init__(self, max_requests: int, tier_levels: Mapping[str, TierLevel], tier_slots: Mapping[str, int] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self._tier_levels = dict(tier_levels)
        self._window = HitRateWindow(max_requests)
        self._lock = threading.Lock()
        self._blocks = dict.fromkeys(ROUTES, 0)  # the compatibility views' source
        self._matched = 0
        r = self.registry
        self.requested_tokens = Counter("kvbm_requested_tokens", "Prompt tokens looked up in the tiers", registry=r)
        self.matched_tokens = Counter("kvbm_matched_tokens_by_level", "Tokens matched in a tier level", ["level"], registry=r)
        self.host_hit_rate = Gauge("kvbm_host_cache_hit_rate", "Host cache hit rate (0-1) over the request window", registry=r)
        self.disk_hit_rate = Gauge("kvbm_disk_cache_hit_rate", "Disk cache hit rate (0-1) over the request window", registry=r)
        self.transfer_blocks = Counter("kvbm_transfer_blocks", "Blocks moved, by route", ["route"], registry=r)
        self.transfer_bytes = Counter("kvbm_transfer_bytes", "Bytes moved, by route", ["route"], registry=r)
        self.transfer_failures = Counter("kvbm_transfer_failures", "Failed transfer operations, by route", ["route"], registry=r)
        self.transfer_seconds = Histogram(
            "kvbm_transfer_seconds", "Duration of one transfer operation, by route", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.tier_blocks = Gauge("kvbm_tier_blocks", "Blocks readable in the tier", ["tier"], registry=r)
        self.tier_capacity = Gauge("kvbm_tier_capacity_blocks", "Slots of the tier per rank", ["tier"], registry=r)
        self.declined_blocks = Counter("kvbm_declined_blocks", "Matched blocks not promised: slower to load than "
                                       "to recompute, by tier", ["tier"], registry=r)
        self.tier_in_service = Gauge("kvbm_tier_in_service", "1 while the tier is used, 0 while its device failed",
                                     ["tier"], registry=r)
        self.recovery_discarded = Gauge("kvbm_tier_recovery_discarded_blocks",
                                        "Records of an earlier process discarded at start (rank 0), by reason",
                                        ["tier", "reason"], registry=r)
        for level in LEVELS.values():
            self.matched_tokens.labels(level)
        for route in ROUTES:
            self._touch(route)
        for tier, slots in (tier_slots or {}).items():
            self.tier_capacity.labels(tier).set(slots)
            self.tier_blocks.labels(tier).set(0)
            self.tier_in_service.labels(tier).set(1)
            self.declined_blocks.labels(tier)
        r.register(CompatibilityCollector(self))

    # --------------------------------------------------------------------------- event updates
    def request_matched(self, requested_tokens: int, host_tokens: int, disk_tokens: int) -> None:
        self.requested_tokens.inc(requested_tokens)
        self.matched_tokens.labels("host").inc(host_tokens)
        self.matched_tokens.labels("disk").inc(disk_tokens)
        with self._lock:
            self._matched += host_tokens + disk_tokens

    def request_finished(self, queried_blocks: int, host_hit_blocks: int, disk_hit_blocks: int) -> None:
        with self._lock:
            self._window.add(queried_blocks, host_hit_blocks, disk_hit_blocks)
            self.host_hit_rate.set(self._window.host_rate)
            self.disk_hit_rate.set(self._window.disk_rate)

    def offloaded(self, route: str, num_blocks: int, num_bytes: int, seconds: float) -> None:
        self._transfer(route, num_blocks, num_bytes, seconds)

    def onboarded(self, tier: str, num_blocks: int, num_bytes: int, seconds: float) -> None:
        level = self._tier_levels.get(tier)
        if level not in ONBOARD_ROUTES:
            log.warning("onboard from a tier of unknown level", tier=tier)
            self._transfer(f"{tier}2d", num_blocks, num_bytes, seconds)
            return
        self._transfer(ONBOARD_ROUTES[level], num_blocks, num_bytes, seconds)

    def failed(self, route: str) -> None:
        self.transfer_failures.labels(route).inc()

    def stored(self, tier: str, count: int) -> None:
        self.tier_blocks.labels(tier).inc(count)

    def removed(self, tier: str, count: int) -> None:
        self.tier_blocks.labels(tier).dec(count)

    def declined(self, tier: str, num_blocks: int) -> None:
        self.declined_blocks.labels(tier).inc(num_blocks)

    def service_changed(self, tier: str, in_service: bool) -> None:
        self.tier_in_service.labels(tier).set(1 if in_service else 0)

    def recovered(self, tier: str, discarded: Mapping[str, int]) -> None:
        for reason, count in discarded.items():
            self.recovery_discarded.labels(tier, reason).set(count)

    def compatibility_values(self) -> dict[str, float]:
        """The seed guide's names -> their values now (the block counts by route, matched tokens, hit rates)."""
        with self._lock:
            values = {name: float(self._blocks[route]) for route, name in {**OFFLOAD_NAMES, **ONBOARD_NAMES}.items()}
            values["kvbm_matched_tokens"] = float(self._matched)
            values["kvbm_host_cache_hit_rate"] = self._window.host_rate
            values["kvbm_disk_cache_hit_rate"] = self._window.disk_rate
        return values

    def _touch(self, route: str) -> None:
        """Create every series of ``route`` at 0, so it is scraped before its first event."""
        self.transfer_blocks.labels(route)
        self.transfer_bytes.labels(route)
        self.transfer_failures.labels(route)
        self.transfer_seconds.labels(route)

    def _transfer(self, route: str, num_blocks: int, num_bytes: int, seconds: float) -> None:
        self.transfer_blocks.labels(route).inc(num_blocks)
        self.transfer_bytes.labels(route).inc(num_bytes)
        self.transfer_seconds.labels(route).observe(seconds)
        with self._lock:
            self._blocks[route] = self._blocks.get(route, 0) + num_blocks


class CompatibilityCollector(Collector):
    """The seed guide's names and Dynamo's dashboard names, as gauges computed at scrape time.

    Hit rates are gauges already (``kvbm_*_cache_hit_rate`` is registered as such), so only their
    ``dynamo_`` copies come from here.
    """

    def __init__(self, metrics: KvbmMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, value in self._metrics.compatibility_values().items():
            if not name.endswith("_hit_rate"):
                yield GaugeMetricFamily(name, f"{name} (seed guide name; only goes up)", value=value)
            yield GaugeMetricFamily(DYNAMO_PREFIX + name, f"{name} under the name Dynamo's dashboard queries", value=value)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return self.collect()


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
            raise ConfigError(
                PORT_VARIABLE,
                f"cannot serve metrics on {addr}:{port} (DYN_KVBM_METRICS_HOST {addr}): {exc.strerror or exc}",
                "a free TCP port, on an address of this machine",
            ) from None
        self.port = self._server.server_port
        host = f"[{addr}]" if ":" in addr else addr
        log.info("serving metrics", address=f"http://{host}:{self.port}/metrics")

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
            exporter.serve(pipeline.settings.metrics.port, pipeline.settings.metrics.host)
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


@hookimpl
def kvbm_tier_service_changed(tier: str, in_service: bool, error: str) -> None:
    if _active is not None:
        _active.metrics.service_changed(tier, in_service)


@hookimpl
def kvbm_tier_recovered(tier: str, recovered: int, discarded: Mapping[str, int]) -> None:
    if _active is not None:
        _active.metrics.recovered(tier, discarded)


@hookimpl
def kvbm_blocks_declined(tier: str, request_id: int, num_blocks: int) -> None:
    if _active is not None:
        _active.metrics.declined(tier, num_blocks)
