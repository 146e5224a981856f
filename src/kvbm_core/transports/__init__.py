"""Core's cluster transports, registered by :mod:`kvbm_core.builtin` like any plugin.

- ``etcd`` (:mod:`.etcd`): a key-value store for leader/worker discovery.
- ``nats`` (:mod:`.nats`): publish/subscribe for KV events.

Both are synchronous facades over asyncio clients (aetcd, nats-py, the ``cluster`` extra) running on
a private event loop thread, with every wait bounded. Their ``diagnose`` classmethods are what
``kvbm doctor`` prints for the configured servers.
"""

from kvbm_core.transports.etcd import EtcdTransport
from kvbm_core.transports.nats import NatsTransport

__all__ = ["EtcdTransport", "NatsTransport"]
