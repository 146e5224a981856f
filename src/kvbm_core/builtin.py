"""Core's own plugins, registered through the ``kvbm`` entry-point group like any other.

- ``lru`` eviction (:mod:`kvbm_core.lru`): lowest retention priority first, then least recently
  made evictable.
- ``inproc`` transport: leader and workers of one process talk through memory.
- ``etcd`` and ``nats`` transports (:mod:`kvbm_core.transports`): discovery and KV events.
- the Prometheus exporter (:mod:`kvbm_core.metrics`) and the cluster services
  (:mod:`kvbm_core.cluster.plugin`: KV events over NATS, registration in etcd): their event hooks are
  re-exported here, so that this module is the one plugin object pluggy registers for core (the
  cluster's functions bind to their hooks by ``specname``).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvbm_core.cluster.plugin import (  # noqa: F401  (hook implementations of the cluster services)
    cluster_blocks_removed,
    cluster_blocks_stored,
    cluster_pipeline_built,
    cluster_pipeline_closed,
)
from kvbm_core.hookspecs import hookimpl
from kvbm_core.interfaces import EvictionPolicy, Transport
from kvbm_core.lru import PriorityLruEviction
from kvbm_core.metrics import (  # noqa: F401  (hook implementations of the exporter)
    kvbm_blocks_declined,
    kvbm_blocks_offloaded,
    kvbm_blocks_onboarded,
    kvbm_blocks_removed,
    kvbm_blocks_stored,
    kvbm_pipeline_built,
    kvbm_pipeline_closed,
    kvbm_request_finished,
    kvbm_request_matched,
    kvbm_tier_recovered,
    kvbm_tier_service_changed,
    kvbm_transfer_failed,
)
from kvbm_core.transports import EtcdTransport, NatsTransport


class InProcessTransport(Transport):
    """Leader and workers share one process (TP=1, or the reference executor's simulated ranks).

    Needs no server: control traffic goes through :mod:`kvbm_core.channel` in memory.
    """

    name = "inproc"

    def close(self) -> None:
        pass


@hookimpl
def kvbm_eviction_policies() -> Sequence[type[EvictionPolicy]]:
    return [PriorityLruEviction]


@hookimpl
def kvbm_transports() -> Sequence[type[Transport]]:
    return [InProcessTransport, EtcdTransport, NatsTransport]
