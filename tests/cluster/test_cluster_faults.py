"""Real etcd and nats-server stopped while the engine serves: no request fails, the tokens equal the
run without kvbm, and once the servers are back the events (resynchronised) and the registration
resume. A server that is down from the start costs one warning line, not one per event."""

from __future__ import annotations

import json
import logging
import threading
import shutil
from pathlib import Path

import pytest
from clusterkit import cluster_profile, conversations, executor_config, restart, wait_for

from kvbm_core.cluster import plugin
from kvbm_core.errors import TransportError
from kvbm_core.settings import KvbmSettings
from kvbm_core.testing import ReferenceExecutor
from kvbm_core.transports import EtcdTransport

CPU_DISK = [{"kind": "cpu", "num_blocks": 10}, {"kind": "disk", "num_blocks": 24}]
NO_FILTER = {"DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}
WORKER = 0x5EED
KEY = f"instances/{WORKER:016x}"


def baseline_tokens(specs):
    return ReferenceExecutor(executor_config()).run(specs).tokens()


def wipe_and_restart_etcd(server) -> None:
    """Start etcd again on the same port with an empty data directory: every key is gone."""
    argv = list(server.proc.args)
    data = Path(argv[argv.index("--data-dir") + 1])
    server.stop()
    shutil.rmtree(data)
    restart(server)


class Lines(logging.Handler):
    """Every record of kvbm's cluster loggers, whatever the engine did to kvbm's logging."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def count(self, logger: str, text: str) -> int:
        return sum(1 for r in self.records if r.name == logger and text in str(r.msg))


@pytest.fixture
def lines():
    handler = Lines()
    loggers = [logging.getLogger(name) for name in ("kvbm.kv_events", "kvbm.registration")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def etcd_record(url: str) -> dict | None:
    client = EtcdTransport(KvbmSettings(transports=["etcd"], transport_options={"etcd": {"endpoints": [url]}}))
    try:
        value = client.get(KEY)
    finally:
        client.close()
    return None if value is None else json.loads(value)


def reconnected(subscriber) -> bool:
    try:
        subscriber.transport.flush()
        return True
    except TransportError:
        return False


def test_servers_stopped_mid_run(etcd_server, nats_server, subscriber, engines, lines):
    specs = conversations(users=3, turns=3)
    expected = baseline_tokens(specs)
    sub = subscriber()
    engine = engines(cluster_profile(CPU_DISK, nats_server.url, etcd_server.url, worker_id=WORKER,
                                     resync_interval_s=0), env=NO_FILTER)
    wait_for(lambda: etcd_record(etcd_server.url), what="the registration")
    finished = []

    def on_finish(index, result):
        finished.append(index)
        if len(finished) == 2:  # both servers go away while requests are in flight
            nats_server.stop()
            etcd_server.stop()
        elif len(finished) == 6:
            restart(nats_server)
            wipe_and_restart_etcd(etcd_server)
        return []

    result = engine.run(specs, on_finish=on_finish)
    assert len(finished) == len(specs)
    assert [r.error for r in result.requests] == [None] * len(specs)
    assert result.tokens() == expected

    # Events: the publisher reconnected and resynchronised; a subscriber that reconnected asks again.
    wait_for(lambda: reconnected(sub), what="the subscriber to reconnect")
    sub.ask_resync()
    wait_for(lambda: sub.index.held(WORKER) == engine.leader_view(), what="the index to match after the restart")
    assert engine.leader_view()["host_pinned"]
    # Registration: the record is back in an etcd that lost every key.
    record = wait_for(lambda: etcd_record(etcd_server.url), what="the record to be put again")
    assert record["worker_id"] == WORKER

    assert lines.count("kvbm.kv_events", "NATS server unreachable") == 1
    assert lines.count("kvbm.registration", "registration lost") == 1
    assert lines.count("kvbm.kv_events", "kv events: publishing") == 2  # connected, and again
    assert engine.publisher.counts.resyncs >= 2


def test_servers_down_from_the_start(etcd_server, nats_server, subscriber, engines, lines):
    nats_server.stop()
    etcd_server.stop()
    specs = conversations(users=2, turns=3)
    expected = baseline_tokens(specs)
    engine = engines(cluster_profile(CPU_DISK, nats_server.url, etcd_server.url, worker_id=WORKER,
                                     resync_interval_s=0), env=NO_FILTER)
    result = engine.run(specs)
    assert [r.error for r in result.requests] == [None] * len(specs)
    assert result.tokens() == expected
    assert lines.count("kvbm.kv_events", "NATS server unreachable") == 1
    assert lines.count("kvbm.registration", "registration lost") == 1

    restart(nats_server)
    restart(etcd_server)
    sub = subscriber()
    sub.ask_resync()
    wait_for(lambda: sub.index.held(WORKER) == engine.leader_view(), what="events once NATS answers")
    assert wait_for(lambda: etcd_record(etcd_server.url), what="the registration once etcd answers")
    assert lines.count("kvbm.kv_events", "NATS server unreachable") == 1  # still one line


def test_close_with_servers_down_stops_its_threads(etcd_server, nats_server, engines):
    engine = engines(cluster_profile(CPU_DISK, nats_server.url, etcd_server.url, worker_id=WORKER), env=NO_FILTER)
    engine.run(conversations(users=1, turns=1))
    wait_for(lambda: engine.publisher.connected, what="connected")
    nats_server.stop()
    etcd_server.stop()
    engine.close()  # returns: the final publish and the lease revocation are bounded by timeout_s
    assert plugin.active_services() is None
    assert not [t.name for t in threading.enumerate() if t.name in ("kvbm-kv-events", "kvbm-registration")]
