"""The cluster services as subscribers of the event hooks (registered by :mod:`kvbm_core.builtin`).

``kvbm_pipeline_built`` starts, for a profile whose ``transports`` list them:

- ``nats`` (and ``transport_options.nats.kv_events.enabled``): a :class:`~.kv_events.KvEventPublisher`
  fed by ``kvbm_blocks_stored`` / ``kvbm_blocks_removed``; its counts join the metrics exporter's
  registry when metrics are served (:class:`~.kv_events.KvEventsCollector`);
- ``etcd`` (and ``transport_options.etcd.registration.enabled``): an
  :class:`~.registration.InstanceRegistration` of this instance's record.

It runs after the metrics exporter's own ``kvbm_pipeline_built`` (``trylast``), so the record can name
the metrics endpoint. ``kvbm_pipeline_closed`` stops both. One pipeline per process is served, as one
is exported; a second one built while the first is open gets neither (a warning says so).

The functions carry ``cluster_`` names and bind to their hooks through ``specname``, so that
:mod:`kvbm_core.builtin` can hold them next to the exporter's hooks of the same names.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvbm_core import metrics
from kvbm_core.cluster import lineage
from kvbm_core.cluster.instance import advertised_host, instance_key, instance_record
from kvbm_core.cluster.kv_events import KvEventPublisher, KvEventsCollector, random_worker_id
from kvbm_core.cluster.registration import InstanceRegistration
from kvbm_core.errors import KvbmError
from kvbm_core.hookspecs import hookimpl
from kvbm_core.logging import get_logger
from kvbm_core.transports.etcd import etcd_options
from kvbm_core.transports.nats import nats_options

log = get_logger("kvbm.cluster")


@dataclass
class ClusterServices:
    """What runs for one pipeline: the KV-event publisher and the registration, either may be absent."""

    pipeline: Any
    worker_id: int
    publisher: KvEventPublisher | None = None
    lineage: lineage.PendingLineage | None = None
    registration: InstanceRegistration | None = None
    collector: KvEventsCollector | None = None
    exporter: Any = None

    def close(self) -> None:
        if self.collector is not None and self.exporter is not None:
            self.exporter.metrics.registry.unregister(self.collector)
        if self.publisher is not None:
            self.publisher.close()
        if self.lineage is not None:
            lineage.detach(self.lineage)
        if self.registration is not None:
            self.registration.close()


_active: ClusterServices | None = None
_active_lock = threading.Lock()


def active_services() -> ClusterServices | None:
    """The cluster services of the pipeline being served in this process, if any."""
    return _active


def start_services(pipeline: Any) -> ClusterServices | None:
    """Start what the pipeline's settings ask for; None when they ask for nothing."""
    settings = pipeline.settings
    nats = nats_options(settings) if "nats" in settings.transports else None
    etcd = etcd_options(settings) if "etcd" in settings.transports else None
    wants_events = nats is not None and nats.kv_events.enabled
    wants_record = etcd is not None and etcd.registration.enabled
    if not (wants_events or wants_record):
        return None
    worker_id = nats.kv_events.worker_id if nats is not None and nats.kv_events.worker_id is not None \
        else random_worker_id()
    services = ClusterServices(pipeline, worker_id)
    exporter = metrics.active_exporter()
    if exporter is not None and exporter.pipeline is not pipeline:
        exporter = None
    if wants_events:
        assert nats is not None
        pending = lineage.attach()
        publisher = KvEventPublisher(nats, worker_id, {t.kind: t.level for t in pipeline.tiers}, pending)
        try:
            publisher.start()
        except KvbmError as exc:  # the client library is missing: serve without events
            lineage.detach(pending)
            log.error("kv events disabled, serving continues", error=str(exc))
        else:
            services.publisher, services.lineage = publisher, pending
            if exporter is not None:
                services.collector, services.exporter = KvEventsCollector(publisher), exporter
                exporter.metrics.registry.register(services.collector)
    if wants_record:
        assert etcd is not None
        metrics_url = None
        if exporter is not None and exporter.port is not None:
            metrics_url = f"http://{advertised_host(settings.metrics.host)}:{exporter.port}/metrics"
        events = None if services.publisher is None else {"subject": services.publisher.subject,
                                                          "servers": list(nats.servers)}  # type: ignore[union-attr]
        record = instance_record(pipeline, worker_id, metrics_url, events)
        registration = InstanceRegistration(etcd, instance_key(worker_id), record)
        registration.start()
        services.registration = registration
    return services


@hookimpl(specname="kvbm_pipeline_built", trylast=True)
def cluster_pipeline_built(pipeline: Any) -> None:
    global _active
    with _active_lock:
        if _active is not None:
            if "nats" in pipeline.settings.transports or "etcd" in pipeline.settings.transports:
                log.warning("cluster services already run for another pipeline in this process; not for this one")
            return
        _active = start_services(pipeline)


@hookimpl(specname="kvbm_pipeline_closed")
def cluster_pipeline_closed(pipeline: Any) -> None:
    global _active
    with _active_lock:
        if _active is None or _active.pipeline is not pipeline:
            return
        services, _active = _active, None
    services.close()


@hookimpl(specname="kvbm_blocks_stored")
def cluster_blocks_stored(tier: str, route: str, keys: np.ndarray, seq_hashes: np.ndarray) -> None:
    services = _active
    if services is not None and services.publisher is not None:
        services.publisher.stored(tier, seq_hashes)


@hookimpl(specname="kvbm_blocks_removed")
def cluster_blocks_removed(tier: str, keys: np.ndarray, seq_hashes: np.ndarray) -> None:
    services = _active
    if services is not None and services.publisher is not None:
        services.publisher.removed(tier, seq_hashes)
