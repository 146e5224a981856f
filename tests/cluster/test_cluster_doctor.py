"""``kvbm doctor --profile <cluster profile>`` against real servers: each server gets a row; a server
that is down is a warning (the engine serves without it), so the exit code stays 0."""

from __future__ import annotations

import json

import yaml
from clusterkit import cluster_profile


def test_doctor_checks_each_server_and_warns_when_one_is_down(run_kvbm, tmp_path, etcd_server, nats_server):
    profile = tmp_path / "cluster.yaml"
    profile.write_text(yaml.safe_dump(cluster_profile([{"kind": "cpu", "capacity_gb": 0.01}], nats_server.url,
                                                      etcd_server.url)))
    up = run_kvbm("doctor", "--json", "--profile", str(profile))
    rows = {c["name"]: c for c in json.loads(up.stdout)["checks"]}
    assert rows[f"etcd {etcd_server.url}"]["status"] == "pass"
    assert "lease was granted and revoked" in rows[f"etcd {etcd_server.url}"]["detail"]
    assert rows[f"nats {nats_server.url}"]["status"] == "pass"
    assert "KV events on 'kv-events'" in rows[f"nats {nats_server.url}"]["detail"]

    etcd_server.stop()
    nats_server.stop()
    down = run_kvbm("doctor", "--json", "--profile", str(profile))
    report = json.loads(down.stdout)
    rows = {c["name"]: c for c in report["checks"]}
    assert rows[f"etcd {etcd_server.url}"]["status"] == "warn"
    assert rows[f"nats {nats_server.url}"]["status"] == "warn"
    assert "serves without KV events" in rows[f"nats {nats_server.url}"]["detail"]
    assert down.returncode == report["exit_code"] == (1 if any(c["status"] == "fail" for c in report["checks"]) else 0)
    assert not [c for c in report["checks"] if c["status"] == "fail" and c["name"].startswith(("etcd", "nats"))]
