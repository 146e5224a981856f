"""Cluster test fixtures: kvbm engines on the reference executor with a cluster profile, and a
KV-event subscriber that rebuilds each worker's index from the events alone (helpers in
clusterkit.py). The servers are tests/conftest.py's (``etcd_server``, ``nats_server``: real
binaries on loopback).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from clusterkit import Engine, EventIndex, Subscriber, executor_config
from kvbm_core.settings import KvbmSettings
from kvbm_core.testing import ExecutorConfig, ReferenceExecutor
from kvbm_core.transports import NatsTransport
from kvbm_core.trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker


@pytest.fixture
def engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Engine]]:
    """``engines(profile_dict, config=..., env=...)`` -> an :class:`Engine` with kvbm's connector
    configured by that profile (as ``DYN_KVBM_PROFILE``); closed at the end of the test."""
    opened: list[Engine] = []

    def make(profile: dict[str, Any], config: ExecutorConfig | None = None, env: dict[str, str] | None = None) -> Engine:
        path = tmp_path / f"profile-{len(opened)}.yaml"
        path.write_text(yaml.safe_dump({"cost_model": {"enabled": False}, **profile}))
        monkeypatch.setenv("DYN_KVBM_PROFILE", str(path))
        monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(tmp_path))
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        engine = Engine(ReferenceExecutor(config or executor_config(),
                                          connector=(KvbmConnectorLeader, KvbmConnectorWorker)))
        opened.append(engine)
        return engine

    yield make
    for engine in opened:
        engine.close()


@pytest.fixture
def subscriber(nats_server: Any) -> Iterator[Callable[..., Subscriber]]:
    opened: list[NatsTransport] = []

    def make(subject: str = "kv-events") -> Subscriber:
        transport = NatsTransport(KvbmSettings(transports=["nats"], transport_options={
            "nats": {"servers": [nats_server.url], "timeout_s": 5}}))
        opened.append(transport)
        index = EventIndex()
        transport.subscribe(subject, index.apply)
        return Subscriber(transport, index, subject)

    yield make
    for transport in opened:
        transport.close()
