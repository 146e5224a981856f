"""The etcd and nats transports against real servers on loopback (fixtures in tests/conftest.py)."""

from __future__ import annotations

import threading

import pytest

from kvbm_core.errors import ConfigError, TransportError
from kvbm_core.registry import Registry
from kvbm_core.settings import KvbmSettings, resolve_settings
from kvbm_core.transports import EtcdTransport, NatsTransport


def cluster_settings(options: dict) -> KvbmSettings:
    return KvbmSettings(transports=["inproc", "etcd", "nats"], transport_options=options)


def test_etcd_put_get_prefix_delete(etcd_server):
    settings = cluster_settings({"etcd": {"endpoints": [etcd_server.url], "timeout_s": 5}})
    first, second = EtcdTransport(settings), EtcdTransport(settings)
    try:
        first.put("workers/0", b"rank0")
        first.put("workers/1", b"\x00\xffbinary")
        assert second.get("workers/0") == b"rank0", "another client sees the value: it is in the server"
        assert second.get("workers/1") == b"\x00\xffbinary"
        assert second.get("workers/2") is None
        assert second.get_prefix("workers/") == {"workers/0": b"rank0", "workers/1": b"\x00\xffbinary"}
        assert first.delete("workers/0") is True
        assert first.delete("workers/0") is False
        assert second.get("workers/0") is None
    finally:
        first.close()
        second.close()
    first.close()  # closing twice is harmless


def test_etcd_uses_the_first_endpoint_that_answers(etcd_server, port_factory):
    dead = f"http://127.0.0.1:{port_factory()}"
    transport = EtcdTransport(cluster_settings({"etcd": {"endpoints": [dead, etcd_server.url], "timeout_s": 3}}))
    try:
        assert transport.endpoint == etcd_server.url
        transport.put("k", b"v")
        assert transport.get("k") == b"v"
    finally:
        transport.close()


def test_etcd_diagnose_reachable_then_unreachable(etcd_server):
    settings = cluster_settings({"etcd": {"endpoints": [etcd_server.url], "timeout_s": 3}})
    (row,) = EtcdTransport.diagnose(settings)
    assert row.status == "pass" and "etcd 3." in row.detail and etcd_server.url in row.name
    assert "lease was granted and revoked" in row.detail
    transport = EtcdTransport(settings)
    etcd_server.stop()
    (row,) = EtcdTransport.diagnose(settings)  # the engine serves without etcd: a warning, not a failure
    assert row.status == "warn" and "unreachable" in row.detail and "serves without its registration" in row.detail
    with pytest.raises(TransportError, match="etcd"):
        transport.put("k", b"v")
    transport.close()
    with pytest.raises(TransportError, match="no endpoint answered"):
        EtcdTransport(settings)


def test_nats_publish_subscribe(nats_server):
    settings = cluster_settings({"nats": {"servers": [nats_server.url], "timeout_s": 5}})
    publisher, subscriber = NatsTransport(settings), NatsTransport(settings)
    received: list[tuple[str, bytes]] = []
    done = threading.Event()

    def handler(subject: str, data: bytes) -> None:
        received.append((subject, data))
        if len(received) == 3:
            done.set()

    try:
        sub = subscriber.subscribe("kvbm.events.>", handler)
        publisher.publish("kvbm.events.stored", b"one")
        publisher.publish("kvbm.other", b"not for us")
        publisher.publish("kvbm.events.removed", b"two")
        publisher.publish("kvbm.events.stored", b"three")
        publisher.flush()
        assert done.wait(5), received
        assert received == [("kvbm.events.stored", b"one"), ("kvbm.events.removed", b"two"), ("kvbm.events.stored", b"three")]
        sub.unsubscribe()
        publisher.publish("kvbm.events.stored", b"after")
        publisher.flush()
        subscriber.flush()  # a round trip: anything still to deliver has arrived
        assert len(received) == 3
    finally:
        publisher.close()
        subscriber.close()


def test_nats_handler_errors_do_not_stop_the_subscription(nats_server, log_capture):
    transport = NatsTransport(cluster_settings({"nats": {"servers": [nats_server.url]}}))
    seen = []
    done = threading.Event()

    def handler(subject: str, data: bytes) -> None:
        if data == b"bad":
            raise ValueError("handler bug")
        seen.append(data)
        done.set()

    try:
        transport.subscribe("x", handler)
        transport.publish("x", b"bad")
        transport.publish("x", b"good")
        transport.flush()
        assert done.wait(5)
        assert seen == [b"good"]
        assert "handler bug" in log_capture.getvalue()
    finally:
        transport.close()


def test_nats_diagnose_reachable_then_unreachable(nats_server):
    settings = cluster_settings({"nats": {"servers": [nats_server.url], "timeout_s": 3}})
    (row,) = NatsTransport.diagnose(settings)
    assert row.status == "pass" and "nats-server 2." in row.detail
    assert "round trip (max payload 1048576 bytes); KV events on 'kv-events'" in row.detail
    nats_server.stop()
    (row,) = NatsTransport.diagnose(settings)  # the engine serves without NATS: a warning, not a failure
    assert row.status == "warn" and "unreachable" in row.detail and "refused" in row.detail.lower()


def test_nats_connect_to_a_stopped_server_fails_within_the_timeout(port_factory):
    settings = cluster_settings({"nats": {"servers": [f"nats://127.0.0.1:{port_factory()}"], "timeout_s": 1}})
    with pytest.raises(TransportError, match="connect timed out"):
        NatsTransport(settings)


def test_transport_options_are_validated_when_settings_resolve(tmp_path):
    registry = Registry()
    profile = tmp_path / "c.yaml"
    profile.write_text("transports: [etcd]\ntransport_options:\n  etcd:\n    endpoints: ['localhost:notaport']\n")
    with pytest.raises(ConfigError, match=r"transport_options\.etcd\.endpoints"):
        resolve_settings({"DYN_KVBM_PROFILE": str(profile)}, registry=registry)
    profile.write_text("transports: [nats]\ntransport_options:\n  nats:\n    timeout_s: -1\n")
    with pytest.raises(ConfigError, match=r"transport_options\.nats\.timeout_s.*> 0"):
        resolve_settings({"DYN_KVBM_PROFILE": str(profile)}, registry=registry)


def test_kv_event_and_registration_options_are_validated(tmp_path):
    registry = Registry()
    profile = tmp_path / "c.yaml"
    for body, key in (
        ("nats:\n    kv_events: {subject: 'kv events'}", r"transport_options\.nats\.kv_events\.subject"),
        ("nats:\n    kv_events: {subject: 'kv.>'}", r"transport_options\.nats\.kv_events\.subject"),
        ("nats:\n    kv_events: {worker_id: -1}", r"transport_options\.nats\.kv_events\.worker_id"),
        ("nats:\n    kv_events: {queue_size: 0}", r"transport_options\.nats\.kv_events\.queue_size"),
        ("nats:\n    kv_events: {sbject: x}", r"transport_options\.nats\.kv_events\.sbject"),
        ("etcd:\n    registration: {lease_ttl_s: 1}", r"transport_options\.etcd\.registration\.lease_ttl_s"),
    ):
        profile.write_text(f"transports: [etcd, nats]\ntransport_options:\n  {body}\n")
        with pytest.raises(ConfigError, match=key):
            resolve_settings({"DYN_KVBM_PROFILE": str(profile)}, registry=registry)
