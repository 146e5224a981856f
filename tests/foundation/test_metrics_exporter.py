"""The Prometheus exporter: started by kvbm_pipeline_built on a free port, fed through
registry.notify, scraped over HTTP in both exposition formats. kvbm's counts are Counters
(``_total``); the seed guide's names and the names Dynamo's dashboard queries are served too, and
every series exists from the start."""

from __future__ import annotations

import socket
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from kvbm_core import metrics
from kvbm_core.errors import ConfigError
from kvbm_core.interfaces import TierLevel
from kvbm_core.ops import TierAllocation
from kvbm_core.registry import Registry
from kvbm_core.settings import KvbmSettings

# Every query of Dynamo's Grafana dashboard (deploy/observability/grafana_dashboards/kvbm.json): the
# bare metric names, no rate(), no labels.
DYNAMO_DASHBOARD = {
    "dynamo_kvbm_host_cache_hit_rate",
    "dynamo_kvbm_disk_cache_hit_rate",
    "dynamo_kvbm_matched_tokens",
    "dynamo_kvbm_offload_blocks_d2h",
    "dynamo_kvbm_offload_blocks_h2d",
    "dynamo_kvbm_offload_blocks_d2d",
    "dynamo_kvbm_onboard_blocks_h2d",
    "dynamo_kvbm_onboard_blocks_d2d",
}
ROUTES = ("d2h", "h2d", "h2disk", "disk2h", "d2disk")

SEED_NAMES = {
    "kvbm_matched_tokens",
    "kvbm_offload_blocks_d2h",
    "kvbm_offload_blocks_h2d",
    "kvbm_offload_blocks_d2d",
    "kvbm_onboard_blocks_d2d",
    "kvbm_onboard_blocks_h2d",
    "kvbm_host_cache_hit_rate",
    "kvbm_disk_cache_hit_rate",
}


@dataclass(frozen=True)
class Pipeline:
    settings: KvbmSettings
    tiers: tuple[TierAllocation, ...]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by (name, labels), read in the Prometheus text format; the OpenMetrics format must
    parse too and carry the same samples (Prometheus asks for it when it can)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=5) as response:
        openmetrics = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    om = {}
    for family in openmetrics_families(openmetrics):
        for s in family.samples:
            if not s.name.endswith("_created"):
                om[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert om == {k: v for k, v in samples.items() if not k[0].endswith("_created")}
    return samples


def types(port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return {family.name: family.type for family in text_string_to_metric_families(response.read().decode())}


def keys(n: int) -> np.ndarray:
    return np.arange(2 * n, dtype=np.uint64).reshape(n, 2)


@pytest.fixture
def exported(port_factory):
    port = port_factory()
    settings = KvbmSettings(metrics={"enabled": True, "port": port}, cache_stats={"max_requests": 3})
    pipeline = Pipeline(settings, (TierAllocation("cpu", TierLevel.HOST, 100), TierAllocation("disk", TierLevel.DISK, 1000)))
    registry = Registry()
    registry.notify("kvbm_pipeline_built", pipeline=pipeline)
    yield registry, pipeline, port
    registry.notify("kvbm_pipeline_closed", pipeline=pipeline)


def test_every_series_exists_from_the_start_at_zero(exported):
    _, _, port = exported
    initial = scrape(port)
    for name in (*SEED_NAMES, *DYNAMO_DASHBOARD, "kvbm_requested_tokens_total"):
        assert initial[(name, ())] == 0, name
    for route in ROUTES:
        for name in ("kvbm_transfer_failures_total", "kvbm_transfer_blocks_total", "kvbm_transfer_bytes_total", "kvbm_transfer_seconds_count"):
            assert initial[(name, (("route", route),))] == 0, (name, route)
    assert initial[("kvbm_matched_tokens_by_level_total", (("level", "disk"),))] == 0
    assert initial[("kvbm_tier_blocks", (("tier", "disk"),))] == 0
    assert initial[("kvbm_tier_in_service", (("tier", "disk"),))] == 1


def test_counts_are_counters_and_the_compatibility_names_are_gauges(exported):
    _, _, port = exported
    kinds = types(port)
    for name in ("kvbm_requested_tokens", "kvbm_matched_tokens_by_level", "kvbm_transfer_blocks", "kvbm_transfer_bytes", "kvbm_transfer_failures"):
        assert kinds[name] == "counter", name
    for name in (*SEED_NAMES, *DYNAMO_DASHBOARD):
        assert kinds[name] == "gauge", name


def test_seed_metrics_have_exact_names_and_values(exported):
    registry, _, port = exported

    notify = registry.notify
    notify("kvbm_request_matched", request_id=1, requested_tokens=1000, device_tokens=200, host_tokens=512, disk_tokens=128)
    notify("kvbm_blocks_offloaded", route="d2h", num_blocks=7, num_bytes=7 * 4096, seconds=0.002)
    notify("kvbm_blocks_offloaded", route="d2h", num_blocks=3, num_bytes=3 * 4096, seconds=0.001)
    notify("kvbm_blocks_offloaded", route="h2disk", num_blocks=5, num_bytes=5 * 4096, seconds=0.02)
    notify("kvbm_blocks_offloaded", route="d2disk", num_blocks=2, num_bytes=2 * 4096, seconds=0.03)
    notify("kvbm_blocks_onboarded", tier="cpu", request_id=1, num_blocks=16, num_bytes=16 * 4096, seconds=0.004)
    notify("kvbm_blocks_onboarded", tier="disk", request_id=1, num_blocks=4, num_bytes=4 * 4096, seconds=0.3)
    notify("kvbm_transfer_failed", route="disk2h", op_id=9, request_id=1, error="checksum mismatch")
    notify("kvbm_blocks_stored", tier="cpu", route="d2h", keys=keys(10), seq_hashes=np.zeros(10, np.uint64))
    notify("kvbm_blocks_removed", tier="cpu", keys=keys(4), seq_hashes=np.zeros(4, np.uint64))

    s = scrape(port)
    assert s[("kvbm_matched_tokens", ())] == 640
    assert s[("kvbm_matched_tokens_by_level_total", (("level", "host"),))] == 512
    assert s[("kvbm_requested_tokens_total", ())] == 1000
    assert s[("kvbm_offload_blocks_d2h", ())] == 10
    assert s[("kvbm_offload_blocks_h2d", ())] == 5, "Dynamo's h2d offload counter is host -> disk"
    assert s[("kvbm_offload_blocks_d2d", ())] == 2, "device -> disk"
    assert s[("kvbm_onboard_blocks_h2d", ())] == 16
    assert s[("kvbm_onboard_blocks_d2d", ())] == 4, "disk -> device"
    for name in SEED_NAMES:
        assert s[(f"dynamo_{name}", ())] == s[(name, ())], name
    assert s[("kvbm_transfer_bytes_total", (("route", "d2h"),))] == 10 * 4096
    assert s[("kvbm_transfer_bytes_total", (("route", "disk2h"),))] == 4 * 4096
    assert s[("kvbm_transfer_blocks_total", (("route", "h2d"),))] == 16
    assert s[("kvbm_transfer_seconds_count", (("route", "d2h"),))] == 2
    assert s[("kvbm_transfer_seconds_sum", (("route", "d2h"),))] == pytest.approx(0.003)
    assert s[("kvbm_transfer_seconds_bucket", (("le", "0.005"), ("route", "disk2h")))] == 0
    assert s[("kvbm_transfer_seconds_bucket", (("le", "0.5"), ("route", "disk2h")))] == 1
    assert s[("kvbm_transfer_failures_total", (("route", "disk2h"),))] == 1
    assert s[("kvbm_transfer_failures_total", (("route", "d2h"),))] == 0
    assert s[("kvbm_tier_blocks", (("tier", "cpu"),))] == 6
    assert s[("kvbm_tier_capacity_blocks", (("tier", "disk"),))] == 1000


def test_a_tier_out_of_service_and_what_recovery_discarded_are_gauges(exported):
    registry, _, port = exported
    registry.notify("kvbm_tier_recovered", tier="disk", recovered=90, discarded={"data_checksum": 3, "torn_header": 1})
    registry.notify("kvbm_tier_service_changed", tier="disk", in_service=False, error="EIO")
    s = scrape(port)
    assert s[("kvbm_tier_in_service", (("tier", "disk"),))] == 0
    assert s[("kvbm_tier_in_service", (("tier", "cpu"),))] == 1
    assert s[("kvbm_tier_recovery_discarded_blocks", (("reason", "data_checksum"), ("tier", "disk")))] == 3
    assert s[("kvbm_tier_recovery_discarded_blocks", (("reason", "torn_header"), ("tier", "disk")))] == 1
    registry.notify("kvbm_tier_service_changed", tier="disk", in_service=True, error="")
    assert scrape(port)[("kvbm_tier_in_service", (("tier", "disk"),))] == 1


def test_hit_rates_are_block_weighted_over_the_last_n_requests(exported):
    registry, _, port = exported  # window of 3 requests
    finished = [(10, 5, 0), (30, 0, 15), (60, 30, 30), (100, 0, 0)]
    for i, (queried, host, disk) in enumerate(finished):
        registry.notify("kvbm_request_finished", request_id=i, queried_blocks=queried, host_hit_blocks=host, disk_hit_blocks=disk)
        window = finished[max(0, i - 2) : i + 1]
        total = sum(q for q, _, _ in window)
        s = scrape(port)
        assert s[("kvbm_host_cache_hit_rate", ())] == pytest.approx(sum(h for _, h, _ in window) / total)
        assert s[("dynamo_kvbm_host_cache_hit_rate", ())] == s[("kvbm_host_cache_hit_rate", ())]
        assert s[("kvbm_disk_cache_hit_rate", ())] == pytest.approx(sum(d for _, _, d in window) / total)
    # After the 4th request the first has left the window: (0 + 30 + 0) / 190 and (15 + 30 + 0) / 190.
    assert s[("kvbm_host_cache_hit_rate", ())] == pytest.approx(30 / 190)


def test_server_stops_when_the_pipeline_closes(exported):
    registry, pipeline, port = exported
    assert metrics.active_exporter() is not None
    registry.notify("kvbm_pipeline_closed", pipeline=pipeline)
    assert metrics.active_exporter() is None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    # Events without an exported pipeline are ignored, not errors.
    registry.notify("kvbm_blocks_offloaded", route="d2h", num_blocks=1, num_bytes=1, seconds=0.0)


def test_disabled_metrics_start_nothing(port_factory):
    port = port_factory()
    pipeline = Pipeline(KvbmSettings(metrics={"enabled": False, "port": port}), ())
    registry = Registry()
    registry.notify("kvbm_pipeline_built", pipeline=pipeline)
    assert metrics.active_exporter() is None
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))  # nobody listens there


def test_port_in_use_is_logged_naming_the_variable_and_serving_continues(log_capture):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        pipeline = Pipeline(KvbmSettings(metrics={"enabled": True, "port": port}), (TierAllocation("cpu", TierLevel.HOST, 8),))
        registry = Registry()
        try:
            registry.notify("kvbm_pipeline_built", pipeline=pipeline)
            exporter = metrics.active_exporter()
            assert exporter is not None and exporter.port is None, "counting goes on without a server"
            registry.notify("kvbm_blocks_offloaded", route="d2h", num_blocks=3, num_bytes=3, seconds=0.0)
            assert exporter.metrics.registry.get_sample_value("kvbm_offload_blocks_d2h") == 3
            assert exporter.metrics.registry.get_sample_value("kvbm_transfer_blocks_total", {"route": "d2h"}) == 3
        finally:
            registry.notify("kvbm_pipeline_closed", pipeline=pipeline)
    assert "DYN_KVBM_METRICS_PORT" in log_capture.getvalue()

    with pytest.raises(ConfigError, match="DYN_KVBM_METRICS_PORT"):
        with socket.socket() as busy:
            busy.bind(("0.0.0.0", 0))
            busy.listen()
            metrics.MetricsExporter(metrics.KvbmMetrics(10, {})).serve(busy.getsockname()[1])


def test_the_server_binds_the_configured_host(port_factory):
    port = port_factory()
    pipeline = Pipeline(KvbmSettings(metrics={"enabled": True, "host": "127.0.0.1", "port": port}), ())
    registry = Registry()
    registry.notify("kvbm_pipeline_built", pipeline=pipeline)
    try:
        exporter = metrics.active_exporter()
        assert exporter is not None and exporter._server.server_address[0] == "127.0.0.1"
        assert ("kvbm_requested_tokens_total", ()) in scrape(port)
    finally:
        registry.notify("kvbm_pipeline_closed", pipeline=pipeline)
