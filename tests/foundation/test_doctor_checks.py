"""``kvbm doctor`` on this machine: real files in a temporary directory, real servers, exit codes
that agree with the printed table."""

from __future__ import annotations

import json
import os
import shutil
import types

import yaml

from kvbm_core import hookimpl
from kvbm_core.cli import doctor, machine
from kvbm_core.interfaces import CheckResult
from kvbm_core.storage import HostStorage
from kvbm_core.registry import Registry
from kvbm_core.settings import KvbmSettings, TierSpec, resolve_settings


def table(stdout: str) -> list[tuple[str, str]]:
    """(check, STATUS) rows of the printed table."""
    lines = stdout.splitlines()
    header = lines[0]
    status_at, detail_at = header.index("STATUS"), header.index("DETAIL")
    rows = []
    for line in lines[1:]:
        if not line.strip():
            break
        rows.append((line[:status_at].strip(), line[status_at:detail_at].strip()))
    return rows


def test_doctor_with_a_disk_profile_in_a_temp_dir(run_kvbm, tmp_path):
    env = {"DYN_KVBM_PROFILE": "disk_only", "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path), "DYN_KVBM_DISK_CACHE_GB": "0.01"}
    proc = run_kvbm("doctor", env=env)
    assert proc.returncode in (0, 1), proc.stderr
    rows = table(proc.stdout)
    statuses = {s for _, s in rows}
    assert statuses <= {"PASS", "WARN", "FAIL"}
    assert proc.returncode == (1 if "FAIL" in statuses else 0), proc.stdout
    names = dict(rows)
    assert names["configuration"] == "PASS"
    assert names[machine.DIRECTORY] == "PASS"
    assert names[machine.FREE_SPACE] == "PASS"
    assert {"cuda", machine.O_DIRECT, machine.FALLOCATE, machine.TRTLLM} <= names.keys()
    assert len(names) == len(rows), "each check is printed once"
    assert "pass," in proc.stdout.splitlines()[-1]
    assert list(tmp_path.iterdir()) == [], "doctor leaves no probe files behind"

    as_json = json.loads(run_kvbm("doctor", "--json", env=env).stdout)
    assert as_json["exit_code"] == proc.returncode
    assert [(c["name"], c["status"].upper()) for c in as_json["checks"]] == rows


def test_doctor_fails_when_the_disk_cannot_hold_the_capacity(run_kvbm, tmp_path):
    # More than is free (the tier refuses to start) but less than the filesystem (resolving accepts it).
    usage = shutil.disk_usage(tmp_path)
    gb = (usage.free + (usage.total - usage.free) / 2) / 1e9
    proc = run_kvbm("doctor", "--json", env={"DYN_KVBM_DISK_CACHE_DIR": str(tmp_path), "DYN_KVBM_DISK_CACHE_GB": f"{gb:.3f}"})
    assert proc.returncode == 1
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    free = checks[machine.FREE_SPACE]
    assert free["status"] == "fail" and "refuses to start" in free["detail"]


def test_a_missing_directory_the_tier_can_create_passes_and_is_not_created(run_kvbm, tmp_path):
    missing = tmp_path / "absent" / "deeper"
    proc = run_kvbm("doctor", "--json", env={"DYN_KVBM_DISK_CACHE_DIR": str(missing), "DYN_KVBM_DISK_CACHE_GB": "0.01"})
    checks = json.loads(proc.stdout)["checks"]
    names = [c["name"] for c in checks]
    assert len(names) == len(set(names)), names
    directory = next(c for c in checks if c["name"] == machine.DIRECTORY)
    assert directory["status"] == "pass" and "creates it at start" in directory["detail"]
    assert not (tmp_path / "absent").exists(), "doctor creates nothing"
    assert list(tmp_path.iterdir()) == []


def test_a_directory_that_cannot_be_created_fails(run_kvbm, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_kvbm("doctor", "--json", env={"DYN_KVBM_DISK_CACHE_DIR": str(blocker / "sub"), "DYN_KVBM_DISK_CACHE_GB": "0.01"})
    assert proc.returncode == 1
    directory = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == machine.DIRECTORY)
    assert directory["status"] == "fail"


def test_no_tier_fails_as_the_connector_refuses(run_kvbm):
    proc = run_kvbm("doctor", "--json")
    assert proc.returncode == 1
    configuration = json.loads(proc.stdout)["checks"][0]
    assert configuration["name"] == "configuration" and configuration["status"] == "fail"
    assert "refuses to start" in configuration["detail"] and "DYN_KVBM_CPU_CACHE_GB" in configuration["detail"]


def test_dynamo_variables_are_warnings(run_kvbm):
    proc = run_kvbm("doctor", "--json", env={"DYN_KVBM_CPU_CACHE_GB": "0.01", "DYN_KVBM_LEADER_ZMQ_HOST": "0.0.0.0"})
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["DYN_KVBM_LEADER_ZMQ_HOST"]["status"] == "warn"
    assert proc.stderr == "", "printed once, as a row"


def test_doctor_with_a_bad_setting_exits_2(run_kvbm):
    proc = run_kvbm("doctor", env={"DYN_KVBM_DISK_CACHE_GB": "eight"})
    assert proc.returncode == 2
    assert proc.stdout == "" and "DYN_KVBM_DISK_CACHE_GB" in proc.stderr and "Traceback" not in proc.stderr


def test_doctor_checks_cluster_servers(run_kvbm, tmp_path, cluster_servers):
    profile = tmp_path / "cluster.yaml"
    profile.write_text(
        yaml.safe_dump({"tiers": [{"kind": "cpu", "capacity_gb": 0.01}], "transports": ["inproc", "etcd", "nats"], "transport_options": cluster_servers.transport_options})
    )
    up = run_kvbm("doctor", "--json", "--profile", str(profile))
    checks = {c["name"]: c["status"] for c in json.loads(up.stdout)["checks"]}
    assert checks[f"etcd {cluster_servers.etcd.url}"] == "pass"
    assert checks[f"nats {cluster_servers.nats.url}"] == "pass"
    assert up.returncode == (1 if "fail" in checks.values() else 0)

    cluster_servers.etcd.stop()
    cluster_servers.nats.stop()
    down = run_kvbm("doctor", "--json", "--profile", str(profile))
    checks = {c["name"]: c["status"] for c in json.loads(down.stdout)["checks"]}
    # the engine serves without them (events and registration wait for the servers): a warning
    assert checks[f"etcd {cluster_servers.etcd.url}"] == "warn"
    assert checks[f"nats {cluster_servers.nats.url}"] == "warn"
    assert down.returncode == (1 if "fail" in checks.values() else 0)


# ------------------------------------------------------------------------- checks in-process
def test_generic_disk_checks_on_a_real_directory(tmp_path):
    spec = TierSpec(kind="disk", capacity_gb=0.001)
    rows = {r.name: r for r in machine.disk(spec, KvbmSettings(disk={"directory": str(tmp_path)}))}
    assert rows[machine.DIRECTORY].status == "pass"
    assert rows[machine.FREE_SPACE].status == "pass"
    # What O_DIRECT and fallocate report must agree with what the filesystem does.
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_RDWR | os.O_DIRECT))
        direct_ok = True
    except OSError:
        direct_ok = False
    assert rows[machine.O_DIRECT].status == ("pass" if direct_ok else "warn"), "the tier falls back to buffered I/O"
    fd = os.open(probe, os.O_RDWR)
    try:
        fallocate_ok = machine._fallocate_errno(fd, 4096) == 0
        if fallocate_ok:
            assert os.fstat(fd).st_blocks > 0, "fallocate reported success: the blocks are allocated"
    finally:
        os.close(fd)
    assert (rows[machine.FALLOCATE].status == "pass") == fallocate_ok
    assert list(p.name for p in tmp_path.iterdir()) == ["probe"]


def test_blocks_only_disk_tier_and_unwritable_directory(tmp_path):
    rows = {r.name: r for r in machine.disk(TierSpec(kind="disk", num_blocks=10), KvbmSettings(disk={"directory": str(tmp_path)}))}
    assert rows[machine.FREE_SPACE].status == "pass" and "10 blocks" in rows[machine.FREE_SPACE].detail
    file_not_dir = tmp_path / "file"
    file_not_dir.write_text("x")
    (row,) = machine.disk(TierSpec(kind="disk", capacity_gb=1), KvbmSettings(disk={"directory": str(file_not_dir)}))
    assert row.status == "fail"


class FragileTier(HostStorage):
    name = "fragile"

    @classmethod
    def diagnose(cls, spec, settings):
        raise RuntimeError("probe crashed")

    @property
    def slots(self):
        raise NotImplementedError("never built: only diagnosed")

    def close(self) -> None:
        pass


class HonestTier(FragileTier):
    name = "honest"

    @classmethod
    def diagnose(cls, spec, settings):
        return [CheckResult("honest tier", "warn", f"{spec.capacity_gb} GB is small")]


def test_tier_diagnose_rows_and_a_raising_diagnose_is_one_failed_row(tmp_path):
    registry = Registry(load_entry_points=False)
    module = types.ModuleType("kvbm_fragile")
    module.kvbm_tier_types = hookimpl(lambda: [FragileTier, HonestTier])
    module.kvbm_tier_types.__name__ = "kvbm_tier_types"
    registry.register(module, "fragile", "kvbm-fragile", "1")
    registry.register(__import__("kvbm_core.builtin", fromlist=["_"]), "core", "kvbm-core", "0.1.0")

    for kind, expected in (("fragile", ("fail", "kvbm-fragile")), ("honest", ("warn", "0.5 GB is small"))):
        profile = tmp_path / f"{kind}.yaml"
        profile.write_text(yaml.safe_dump({"tiers": [{"kind": kind, "capacity_gb": 0.5}]}))
        rows = doctor.diagnose(resolve_settings({"DYN_KVBM_PROFILE": str(profile)}, registry=registry), registry)
        plugin_rows = [r for r in rows if kind in r.name]
        assert len(plugin_rows) == 1
        assert plugin_rows[0].status == expected[0] and expected[1] in plugin_rows[0].detail
        assert doctor.exit_code(rows) == (1 if any(r.status == "fail" for r in rows) else 0)
        if kind == "fragile":
            assert doctor.exit_code(rows) == 1
