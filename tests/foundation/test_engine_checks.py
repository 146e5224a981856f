"""The engine settings kvbm refuses, checked once for the connector (``llm_args``) and for ``kvbm
doctor --llm-api-config`` (a YAML): doctor fails exactly where the connector refuses to start, and
finds TensorRT-LLM (version, connector module) from its installed distribution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kvbm_core.errors import ConfigError
from kvbm_core.settings.profiles import configs_dir
from kvbm_core.testing.llm_args import KvCacheConfig, KvCacheConnectorConfig, ParallelConfig, TorchLlmArgs
from kvbm_core.trtllm.engine_checks import FAIL, PASS, WARN, check_engine_settings, engine_findings

GOOD = yaml.safe_load((configs_dir() / "trtllm" / "kvbm_llm_api_config.yaml").read_text())
CONNECTOR = GOOD["kv_connector_config"]

# (name, change to the good YAML, key that fails or warns, status)
CASES = [
    ("block reuse off", {"kv_cache_config": {**GOOD["kv_cache_config"], "enable_block_reuse": False}}, "kv_cache_config.enable_block_reuse", FAIL),
    ("host cache", {"kv_cache_config": {**GOOD["kv_cache_config"], "host_cache_size": 1 << 30}}, "kv_cache_config.host_cache_size", FAIL),
    ("pipeline parallel", {"pipeline_parallel_size": 2}, "pipeline_parallel_size", FAIL),
    ("ranks on two hosts", {"tensor_parallel_size": 16, "gpus_per_node": 8}, "tensor_parallel_size", FAIL),
    ("partial reuse", {"kv_cache_config": {**GOOD["kv_cache_config"], "enable_partial_reuse": True}}, "kv_cache_config.enable_partial_reuse", WARN),
]


def llm_args(data: dict) -> TorchLlmArgs:
    """The ``llm_args`` TensorRT-LLM would build from an LLM-API YAML (the fields connectors read)."""
    kv = data.get("kv_cache_config", {})
    pp = data.get("pipeline_parallel_size", 1)
    tp = data.get("tensor_parallel_size", 1)
    connector = data.get("kv_connector_config")
    return TorchLlmArgs(
        model="tiny",
        tensor_parallel_size=tp,
        parallel_config=ParallelConfig(tp_size=tp, pp_size=pp),
        kv_cache_config=KvCacheConfig(
            enable_block_reuse=kv.get("enable_block_reuse", True),
            enable_partial_reuse=kv.get("enable_partial_reuse", True),
            host_cache_size=kv.get("host_cache_size"),
        ),
        kv_connector_config=KvCacheConnectorConfig(**connector) if connector else None,
        max_seq_len=1024, max_batch_size=1, max_num_tokens=1024, enable_chunked_prefill=False,
        disable_overlap_scheduler=False, cuda_graph_config=None, dtype="float32", kv_cache_dtype="float32",
        pipeline_parallel_size=pp, gpus_per_node=data.get("gpus_per_node"),
    )  # fmt: skip


def statuses(findings) -> dict[str, str]:
    return {f.key: f.status for f in findings}


def test_the_bundled_config_passes_and_the_baseline_does_not_load_kvbm():
    assert set(statuses(engine_findings(GOOD)).values()) == {PASS}
    check_engine_settings(llm_args(GOOD))
    baseline = yaml.safe_load((configs_dir() / "trtllm" / "llm_api_config_baseline.yaml").read_text())
    assert statuses(engine_findings(baseline))["kv_connector_config"] == FAIL


@pytest.mark.parametrize(("name", "change", "key", "status"), CASES, ids=[c[0] for c in CASES])
def test_yaml_and_llm_args_get_the_same_verdict(name, change, key, status, log_capture):
    data = {**GOOD, **change}
    assert statuses(engine_findings(data))[key] == status
    assert statuses(engine_findings(llm_args(data)))[key] == status
    if status == FAIL:
        with pytest.raises(ConfigError) as info:
            check_engine_settings(llm_args(data))
        assert info.value.source == key
    else:
        check_engine_settings(llm_args(data))
        assert "partial reuse is on" in log_capture.getvalue()


@pytest.mark.parametrize(("name", "change", "key", "status"), [c for c in CASES if c[3] == FAIL], ids=[c[0] for c in CASES if c[3] == FAIL])
def test_the_connector_refuses_what_doctor_fails(name, change, key, status, monkeypatch):
    from kvbm_core.trtllm.connector import KvbmConnectorLeader

    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "0.01")
    with pytest.raises(ConfigError) as info:
        KvbmConnectorLeader(llm_args({**GOOD, **change}))
    assert info.value.source == key


def test_absent_partial_reuse_is_trtllm_default_on():
    data = {**GOOD, "kv_cache_config": {"enable_block_reuse": True}}
    (finding,) = [f for f in engine_findings(data) if f.key == "kv_cache_config.enable_partial_reuse"]
    assert finding.status == WARN and "default" in finding.detail


@pytest.mark.parametrize(
    ("connector", "key"),
    [
        ({**CONNECTOR, "connector_module": "kvbm_core.trtllm.connectr"}, "kv_connector_config.connector_module"),
        ({**CONNECTOR, "connector_scheduler_class": "KvbmLeader"}, "kv_connector_config.connector_scheduler_class"),
        ({**CONNECTOR, "connector_worker_class": None}, "kv_connector_config.connector_worker_class"),
    ],
)
def test_connector_lines_name_an_importable_module_and_existing_classes(connector, key):
    findings = {f.key: f for f in engine_findings({**GOOD, "kv_connector_config": connector})}
    assert findings[key].status == FAIL
    if key.endswith("scheduler_class"):
        assert "KvbmConnectorLeader" in findings[key].accepted


def test_doctor_checks_an_llm_api_config(run_kvbm, tmp_path):
    env = {"DYN_KVBM_CPU_CACHE_GB": "0.01"}
    good = run_kvbm("doctor", "--json", "--llm-api-config", str(configs_dir() / "trtllm" / "kvbm_llm_api_config.yaml"), env=env)
    rows = {c["name"]: c["status"] for c in json.loads(good.stdout)["checks"]}
    assert rows["llm-api kv_cache_config.enable_block_reuse"] == "pass"
    assert all(v == "pass" for k, v in rows.items() if k.startswith("llm-api")), rows

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**GOOD, "kv_cache_config": {"enable_block_reuse": False}, "pipeline_parallel_size": 2}))
    proc = run_kvbm("doctor", "--json", "--llm-api-config", str(bad), env=env)
    assert proc.returncode == 1
    rows = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert rows["llm-api kv_cache_config.enable_block_reuse"]["status"] == "fail"
    assert rows["llm-api pipeline_parallel_size"]["status"] == "fail"
    assert rows["llm-api kv_cache_config.enable_partial_reuse"]["status"] == "warn"

    broken = tmp_path / "broken.yaml"
    broken.write_text("kv_cache_config: {enable_block_reuse: true\n")
    proc = run_kvbm("doctor", "--llm-api-config", str(broken), env=env)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "line" in proc.stderr, proc.stderr


def fake_trtllm(root: Path, version: str, module: str | None) -> Path:
    """An installed ``tensorrt_llm`` distribution as importlib.metadata reads it: METADATA and RECORD."""
    info = root / f"tensorrt_llm-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: {version}\n")
    files = [f"{module.replace('.', '/')}.py,," if module else "tensorrt_llm/__init__.py,,"]
    (info / "RECORD").write_text("\n".join(files) + "\n")
    return root


@pytest.mark.parametrize(
    ("version", "module", "status", "text"),
    [
        ("1.3.0", "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector", "pass", "connectors.kv_cache_connector"),
        ("1.2.0", "tensorrt_llm._torch.pyexecutor.kv_cache_connector", "pass", "1.2.0; connector API tensorrt_llm._torch.pyexecutor.kv_cache_connector"),
        ("1.1.0", "tensorrt_llm._torch.pyexecutor.kv_cache_connector", "fail", "1.2 or newer"),
        ("1.2.0", None, "fail", "ships neither"),
    ],
)
def test_doctor_finds_trtllm_and_its_connector_module(run_kvbm, tmp_path, version, module, status, text):
    site = fake_trtllm(tmp_path / "site", version, module)
    proc = run_kvbm("doctor", "--json", env={"DYN_KVBM_CPU_CACHE_GB": "0.01"}, pythonpath=site)
    row = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "tensorrt-llm")
    assert row["status"] == status and text in row["detail"], row


def test_doctor_without_trtllm_warns(run_kvbm):
    proc = run_kvbm("doctor", "--json", env={"DYN_KVBM_CPU_CACHE_GB": "0.01"})
    row = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "tensorrt-llm")
    assert row["status"] == "warn" and "not installed" in row["detail"]
