"""The files in configs/: TRT-LLM LLM-API examples and the Prometheus/Grafana files."""

from __future__ import annotations

import importlib
import json
import re

import yaml
from prometheus_client import generate_latest

from kvbm_core.interfaces import TierLevel
from kvbm_core.metrics import KvbmMetrics
from kvbm_core.settings.profiles import configs_dir

TRTLLM = configs_dir() / "trtllm"


def load(name: str) -> dict:
    return yaml.safe_load((TRTLLM / name).read_text())


def test_connector_configs_enable_kvbm_with_block_reuse_and_no_partial_reuse():
    for name, leader, worker in (
        ("kvbm_llm_api_config.yaml", "KvbmConnectorLeader", "KvbmConnectorWorker"),
        ("kvbm_llm_api_config_dynamo_names.yaml", "DynamoKVBMConnectorLeader", "DynamoKVBMConnectorWorker"),
    ):
        config = load(name)
        assert config["backend"] == "pytorch"
        assert config["kv_cache_config"]["enable_block_reuse"] is True
        assert config["kv_cache_config"]["enable_partial_reuse"] is False
        connector = config["kv_connector_config"]
        assert connector == {
            "connector_module": "kvbm_core.trtllm.connector",
            "connector_scheduler_class": leader,
            "connector_worker_class": worker,
        }
        module = importlib.import_module(connector["connector_module"])
        assert isinstance(getattr(module, leader), type) and isinstance(getattr(module, worker), type)


def test_baseline_is_the_same_without_the_connector():
    baseline, with_kvbm = load("llm_api_config_baseline.yaml"), load("kvbm_llm_api_config.yaml")
    assert "kv_connector_config" not in baseline
    assert baseline == {k: v for k, v in with_kvbm.items() if k != "kv_connector_config"}


def test_dashboard_queries_only_metrics_the_exporter_serves():
    dashboard = json.loads((configs_dir() / "prometheus" / "grafana" / "kvbm_dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    served = generate_latest(KvbmMetrics(10, {"cpu": TierLevel.HOST}, {"cpu": 8}).registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in served.splitlines() if line and not line.startswith("#")}
    queried = set(re.findall(r"\b(kvbm_[a-z0-9_]+)", exprs))
    assert queried and queried <= names, queried - names
    scrape = yaml.safe_load((configs_dir() / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["localhost:6880"]
