"""Each engine instance's record in a real etcd, under a lease: present while it serves, gone when
it stops (revoked) or dies (expired), and listed by ``kvbm cluster``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from clusterkit import cluster_profile, conversations, wait_for

from kvbm_core.settings import KvbmSettings
from kvbm_core.transports import EtcdTransport

CPU = [{"kind": "cpu", "num_blocks": 32}]
ENGINE = Path(__file__).with_name("engine_process.py")


def etcd_client(url: str) -> EtcdTransport:
    return EtcdTransport(KvbmSettings(transports=["etcd"], transport_options={"etcd": {"endpoints": [url]}}))


def test_record_while_serving_revoked_at_close(etcd_server, nats_server, engines, run_kvbm, port_factory):
    port = port_factory()
    engine = engines(cluster_profile(CPU, nats_server.url, etcd_server.url, worker_id=0xABC),
                     env={"DYN_KVBM_METRICS": "true", "DYN_KVBM_METRICS_PORT": str(port)})
    engine.run(conversations(users=1, turns=1))
    client = etcd_client(etcd_server.url)
    try:
        value = wait_for(lambda: client.get("instances/0000000000000abc"), what="the instance record")
        record = json.loads(value)
        assert record["worker_id"] == 0xABC and record["pid"] == os.getpid()
        assert record["tiers"] == [{"kind": "cpu", "level": "host", "storage_tier": "host_pinned", "num_slots": 32,
                                    "kv_bytes": 32 * engine.manager.layout.bytes_per_block}]
        assert record["layout"]["tokens_per_block"] == 16 and record["world_size"] == 1
        assert record["metrics"].endswith(f":{port}/metrics")
        assert record["kv_events"] == {"subject": "kv-events", "servers": [nats_server.url]}

        listed = run_kvbm("cluster", "--json", "--endpoint", etcd_server.url)
        assert listed.returncode == 0, listed.stderr
        assert [r["worker_id"] for r in json.loads(listed.stdout)["instances"]] == [0xABC]
        table = run_kvbm("cluster", "--endpoint", etcd_server.url)
        assert table.returncode == 0 and "0000000000000abc" in table.stdout and "kv-events" in table.stdout

        engine.close()
        assert client.get("instances/0000000000000abc") is None, "close revokes the lease: the record goes at once"
        empty = run_kvbm("cluster", "--endpoint", etcd_server.url)
        assert empty.returncode == 0 and "no live kvbm instance" in empty.stdout
    finally:
        client.close()


def test_record_of_a_killed_process_expires_with_its_lease(etcd_server, tmp_path, kvbm_env):
    profile = tmp_path / "cluster.yaml"
    profile.write_text(yaml.safe_dump(cluster_profile(CPU, etcd_url=etcd_server.url)))  # lease TTL 3 s
    env = kvbm_env({"DYN_KVBM_PROFILE": str(profile), "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path)})
    proc = subprocess.Popen([sys.executable, str(ENGINE)], env=env, stdout=subprocess.PIPE, text=True)
    client = etcd_client(etcd_server.url)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "serving"
        records = wait_for(lambda: client.get_prefix("instances/"), what="the subprocess's record")
        assert [json.loads(v)["pid"] for v in records.values()] == [proc.pid]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not client.get_prefix("instances/"), timeout_s=30, what="the lease to expire")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        client.close()


def test_cluster_command_exit_codes(run_kvbm, port_factory, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"transports": ["etcd"], "transport_options": {"etcd": {
        "endpoints": [f"http://127.0.0.1:{port_factory()}"], "timeout_s": 1}}}))
    down = run_kvbm("cluster", "--profile", str(profile))
    assert down.returncode == 1 and "etcd" in down.stderr and "Traceback" not in down.stderr
    bad = run_kvbm("cluster", "--endpoint", "127.0.0.1:notaport")
    assert bad.returncode == 2 and "--endpoint" in bad.stderr
    profile.write_text("transports: [etcd]\ntransport_options:\n  etcd:\n    registration: {lease_ttl_s: 0}\n")
    invalid = run_kvbm("cluster", "--profile", str(profile))
    assert invalid.returncode == 2 and "transport_options.etcd.registration.lease_ttl_s" in invalid.stderr


def test_unreadable_values_are_named_not_fatal(etcd_server, run_kvbm):
    client = etcd_client(etcd_server.url)
    try:
        client.put("instances/junk", b"not json")
    finally:
        client.close()
    listed = run_kvbm("cluster", "--json", "--endpoint", etcd_server.url)
    assert listed.returncode == 0
    assert json.loads(listed.stdout) == {"endpoints": [etcd_server.url], "prefix": "kvbm/", "instances": [],
                                         "unreadable": ["instances/junk"]}
