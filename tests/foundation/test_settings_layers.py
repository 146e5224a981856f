"""Settings: defaults < profile < environment key by key, every seed variable, the three flat
pipelines of the seed guide, and errors that name the variable or key and the accepted values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvbm_core.errors import ConfigError
from kvbm_core.ops import Route
from kvbm_core.registry import Registry
from kvbm_core.settings import KvbmSettings, flatten, plan_pipeline, resolve_settings
from kvbm_core.settings.profiles import bundled_profiles


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(blocked=())


def write_profile(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ----------------------------------------------------------------------------------- layering
# (display key, profile fragment, profile value, variable, variable text, environment value)
LAYERED = [
    ("disk.directory", {"disk": {"directory": "/profile/dir"}}, "/profile/dir", "DYN_KVBM_DISK_CACHE_DIR", "/env/dir", "/env/dir"),
    ("disk.zerofill_fallback", {"disk": {"zerofill_fallback": True}}, True, "DYN_KVBM_DISK_ZEROFILL_FALLBACK", "false", False),
    ("disk.disable_o_direct", {"disk": {"disable_o_direct": True}}, True, "DYN_KVBM_DISK_DISABLE_O_DIRECT", "0", False),
    ("leader_worker_init_timeout_secs", {"leader_worker_init_timeout_secs": 60}, 60.0, "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", "3600", 3600.0),
    ("weights_fingerprint", {"weights_fingerprint": "full"}, "full", "DYN_KVBM_WEIGHTS_FINGERPRINT", "Sampled", "sampled"),
    ("metrics.enabled", {"metrics": {"enabled": True}}, True, "DYN_KVBM_METRICS", "off", False),
    ("metrics.port", {"metrics": {"port": 7000}}, 7000, "DYN_KVBM_METRICS_PORT", "7001", 7001),
    ("metrics.host", {"metrics": {"host": "::1"}}, "::1", "DYN_KVBM_METRICS_HOST", "127.0.0.1", "127.0.0.1"),
    ("cache_stats.log_interval_secs", {"cache_stats": {"log_interval_secs": 30}}, 30.0, "DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS", "0", 0.0),
    ("host_offload_prefix_min_priority", {"host_offload_prefix_min_priority": 10}, 10, "DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY", "50", 50),
    ("cache_stats.max_requests", {"cache_stats": {"max_requests": 10}}, 10, "DYN_KVBM_CACHE_STATS_MAX_REQUESTS", "20", 20),
    ("logging.format", {"logging": {"format": "json"}}, "json", "DYN_KVBM_LOG_FORMAT", "CONSOLE", "console"),
    ("logging.level", {"logging": {"level": "debug"}}, "debug", "DYN_KVBM_LOG_LEVEL", "warning", "warning"),
    ("disk_offload_filter.enabled", {"disk_offload_filter": {"enabled": False}}, False, "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", "false", True),
]


@pytest.mark.parametrize(("key", "fragment", "profile_value", "variable", "text", "env_value"), LAYERED, ids=[c[0] for c in LAYERED])
def test_each_key_layers_default_profile_environment(tmp_path, registry, key, fragment, profile_value, variable, text, env_value):
    default = flatten(KvbmSettings())[key]
    assert default != profile_value != env_value, "each layer must change the value"

    plain = resolve_settings({}, registry=registry)
    assert flatten(plain.settings)[key] == default
    assert plain.source_of(key) == "default"

    profile = write_profile(tmp_path, fragment)
    from_profile = resolve_settings({"DYN_KVBM_PROFILE": profile}, registry=registry)
    assert flatten(from_profile.settings)[key] == profile_value
    assert from_profile.source_of(key) == f"profile:{profile}"

    from_env = resolve_settings({"DYN_KVBM_PROFILE": profile, variable: text}, registry=registry)
    assert flatten(from_env.settings)[key] == env_value
    assert from_env.source_of(key) == f"env:{variable}"
    others = {k: v for k, v in flatten(from_env.settings).items() if k != key}
    assert others == {k: v for k, v in flatten(from_profile.settings).items() if k != key}, "only that key changed"


def test_tier_sizes_layer_and_block_override_wins(tmp_path, registry):
    profile = write_profile(tmp_path, {"tiers": [{"kind": "cpu", "capacity_gb": 4}, {"kind": "disk", "capacity_gb": 8}]})
    r = resolve_settings({"DYN_KVBM_PROFILE": profile, "DYN_KVBM_CPU_CACHE_GB": "2.5"}, registry=registry)
    assert r.settings.tier("cpu").capacity_gb == 2.5
    assert r.source_of("tiers.cpu.capacity_gb") == "env:DYN_KVBM_CPU_CACHE_GB"
    assert r.settings.tier("disk").capacity_gb == 8
    assert r.source_of("tiers.disk.capacity_gb") == f"profile:{profile}"

    r = resolve_settings(
        {"DYN_KVBM_PROFILE": profile, "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "1000", "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "5000"},
        registry=registry,
    )
    cpu, disk = r.settings.tier("cpu"), r.settings.tier("disk")
    assert (cpu.num_blocks, cpu.capacity_gb, cpu.effective_size) == (1000, 4, 1000)
    assert (disk.num_blocks, disk.effective_size) == (5000, 5000)
    assert r.source_of("tiers.disk.num_blocks") == "env:DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS"

    # A GB variable alone replaces the profile's block count: the environment is the top layer.
    blocks_profile = write_profile(tmp_path, {"tiers": [{"kind": "cpu", "num_blocks": 100}]})
    r = resolve_settings({"DYN_KVBM_PROFILE": blocks_profile, "DYN_KVBM_CPU_CACHE_GB": "3"}, registry=registry)
    assert (r.settings.tier("cpu").num_blocks, r.settings.tier("cpu").capacity_gb) == (None, 3)


def test_zero_gb_from_environment_removes_the_tier(registry):
    r = resolve_settings({"DYN_KVBM_PROFILE": "cpu_disk", "DYN_KVBM_CPU_CACHE_GB": "0"}, registry=registry)
    assert [t.kind for t in r.settings.tiers] == ["disk"]
    assert plan_pipeline(r.settings, registry).offload == (Route.D2H, Route.H2DISK, Route.D2DISK)


# ------------------------------------------------------------------------- every seed variable
def test_every_seed_variable_is_parsed(registry):
    env = {
        "DYN_KVBM_CPU_CACHE_GB": "4",
        "DYN_KVBM_DISK_CACHE_GB": "8.5",
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "123",
        "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "456",
        "DYN_KVBM_DISK_CACHE_DIR": "/var/cache/kvbm",
        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "1",
        "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "3600",
        "DYN_KVBM_DISK_ZEROFILL_FALLBACK": "yes",
        "DYN_KVBM_DISK_DISABLE_O_DIRECT": "True",
        "DYN_KVBM_METRICS": "true",
        "DYN_KVBM_METRICS_PORT": "6881",
        "DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY": "35",
    }
    r = resolve_settings(env, registry=registry)
    s = r.settings
    cpu, disk = s.tier("cpu"), s.tier("disk")
    assert (cpu.capacity_gb, cpu.num_blocks) == (4.0, 123)
    assert (disk.capacity_gb, disk.num_blocks) == (8.5, 456)
    assert s.disk.directory == "/var/cache/kvbm"
    assert s.disk_offload_filter.enabled is False
    assert s.leader_worker_init_timeout_secs == 3600.0
    assert s.disk.zerofill_fallback is True
    assert s.disk.disable_o_direct is True
    assert s.metrics.enabled is True
    assert s.metrics.port == 6881
    assert s.host_offload_prefix_min_priority == 35
    assert {r.source_of(k) for k in ("tiers.cpu.capacity_gb", "disk.directory", "metrics.port")} == {
        "env:DYN_KVBM_CPU_CACHE_GB",
        "env:DYN_KVBM_DISK_CACHE_DIR",
        "env:DYN_KVBM_METRICS_PORT",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("yes", True), ("on", True), ("false", False), ("0", False), ("no", False), ("off", False), ("FALSE", False)],
)
def test_booleans_parse_as_booleans(registry, text, expected):
    # Dynamo treats a set variable as on; here "false" is false.
    s = resolve_settings({"DYN_KVBM_METRICS": text, "DYN_KVBM_DISK_DISABLE_O_DIRECT": text}, registry=registry).settings
    assert s.metrics.enabled is expected
    assert s.disk.disable_o_direct is expected


def test_empty_variable_counts_as_unset(registry):
    r = resolve_settings({"DYN_KVBM_CPU_CACHE_GB": "", "DYN_KVBM_METRICS": " "}, registry=registry)
    assert r.settings.tiers == [] and r.settings.metrics.enabled is False
    assert r.sources == {}


def test_defaults_match_the_seed_guide():
    s = KvbmSettings()
    assert s.tiers == []
    assert s.leader_worker_init_timeout_secs == 1800
    assert s.metrics.enabled is False and s.metrics.port == 6880
    assert s.disk.directory is None, "None: the disk tier picks a private per-user directory"
    assert s.metrics.host == "0.0.0.0"
    assert s.cache_stats.log_interval_secs == 5
    assert s.disk_offload_filter.enabled is True and s.disk_offload_filter.name == "frequency"
    assert s.host_offload_prefix_min_priority == 0
    assert s.cache_stats.max_requests == 1000


# ----------------------------------------------------------------------- the three pipelines
def test_cpu_only_pipeline(registry):
    r = resolve_settings({"DYN_KVBM_CPU_CACHE_GB": "4"}, registry=registry)
    assert [(t.kind, t.capacity_gb) for t in r.settings.tiers] == [("cpu", 4.0)]
    plan = plan_pipeline(r.settings, registry)
    assert plan.shape == "host"
    assert plan.offload == (Route.D2H,) and plan.onboard == (Route.H2D,)
    assert plan.disk_filter is None


def test_cpu_and_disk_pipeline_filters_host_to_disk_by_default(registry):
    r = resolve_settings({"DYN_KVBM_CPU_CACHE_GB": "4", "DYN_KVBM_DISK_CACHE_GB": "8"}, registry=registry)
    assert [(t.kind, t.capacity_gb) for t in r.settings.tiers] == [("cpu", 4.0), ("disk", 8.0)]
    plan = plan_pipeline(r.settings, registry)
    assert plan.shape == "host+disk"
    assert plan.offload == (Route.D2H, Route.H2DISK, Route.D2DISK)
    assert plan.onboard == (Route.DISK2H, Route.H2D)
    assert plan.disk_filter == "frequency"

    off = resolve_settings(
        {"DYN_KVBM_CPU_CACHE_GB": "4", "DYN_KVBM_DISK_CACHE_GB": "8", "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}, registry=registry
    )
    assert plan_pipeline(off.settings, registry).disk_filter is None


def test_disk_only_pipeline_stages_through_host_without_filter(registry):
    """A disk-only profile still moves blocks through a small host staging tier, unfiltered."""
    r = resolve_settings({"DYN_KVBM_DISK_CACHE_GB": "8"}, registry=registry)
    assert [(t.kind, t.capacity_gb) for t in r.settings.tiers] == [("disk", 8.0)]
    plan = plan_pipeline(r.settings, registry)
    assert plan.shape == "disk"
    assert plan.offload == (Route.D2H, Route.H2DISK, Route.D2DISK)
    assert plan.onboard == (Route.DISK2H, Route.H2D)
    assert plan.disk_filter is None


def test_no_tier_is_described_and_refused_where_needed(registry):
    plan = plan_pipeline(resolve_settings({}, registry=registry).settings, registry)
    assert plan.shape == "none"
    with pytest.raises(ConfigError, match="DYN_KVBM_CPU_CACHE_GB"):
        plan.require_tiers()


# ---------------------------------------------------------------------------------- profiles
def test_bundled_profiles_resolve(registry):
    assert set(bundled_profiles()) >= {"cpu", "cpu_disk", "disk_only", "gds", "cluster"}
    shapes = {name: plan_pipeline(resolve_settings({"DYN_KVBM_PROFILE": name}, registry=registry).settings, registry).shape for name in bundled_profiles()}
    assert shapes["cpu"] == "host" and shapes["cpu_disk"] == "host+disk" and shapes["disk_only"] == "disk"
    cluster = resolve_settings({"DYN_KVBM_PROFILE": "cluster"}, registry=registry).settings
    assert cluster.transports == ["inproc", "etcd", "nats"]


def test_profile_argument_wins_over_the_variable(registry):
    r = resolve_settings({"DYN_KVBM_PROFILE": "cpu"}, profile="disk_only", registry=registry)
    assert r.profile == "disk_only" and [t.kind for t in r.settings.tiers] == ["disk"]


# ------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("env", "names", "accepted"),
    [
        ({"DYN_KVBM_CPU_CACHE_GB": "abc"}, "DYN_KVBM_CPU_CACHE_GB", ">= 0"),
        ({"DYN_KVBM_CPU_CACHE_GB": "-1"}, "DYN_KVBM_CPU_CACHE_GB", ">= 0"),
        ({"DYN_KVBM_DISK_CACHE_GB": "nan"}, "DYN_KVBM_DISK_CACHE_GB", ">= 0"),
        ({"DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "1.5"}, "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "whole number"),
        ({"DYN_KVBM_METRICS": "maybe"}, "DYN_KVBM_METRICS", "true/false"),
        ({"DYN_KVBM_METRICS_PORT": "70000"}, "DYN_KVBM_METRICS_PORT", "from 1 to 65535"),
        ({"DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY": "101"}, "DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY", "from 0 to 100"),
        ({"DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "0"}, "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", "> 0"),
        ({"DYN_KVBM_LOG_FORMAT": "xml"}, "DYN_KVBM_LOG_FORMAT", "console, json"),
        ({"DYN_KVBM_WEIGHTS_FINGERPRINT": "off"}, "DYN_KVBM_WEIGHTS_FINGERPRINT", "sampled, full"),
        ({"DYN_KVBM_PROFILE": "no_such_profile"}, "DYN_KVBM_PROFILE", "cpu_disk"),
        ({"DYN_KVBM_PROFILE": "/nonexistent/profile.yaml"}, "DYN_KVBM_PROFILE", ".yaml"),
    ],
)
def test_bad_environment_names_variable_and_accepted_values(registry, env, names, accepted):
    with pytest.raises(ConfigError) as info:
        resolve_settings(env, registry=registry)
    assert info.value.source == names
    assert accepted in str(info.value)


@pytest.mark.parametrize(
    ("data", "key", "accepted"),
    [
        ({"tiers": [{"kind": "floppy", "capacity_gb": 1}]}, "tiers[0].kind", "cpu"),
        ({"tiers": [{"kind": "cpu", "capacity_gb": "lots"}]}, "tiers[0].capacity_gb", ">= 0"),
        ({"tiers": [{"kind": "cpu"}]}, "tiers[0]", None),
        ({"tiers": [{"kind": "cpu", "capacity_gb": 0}]}, "tiers[0]", None),
        ({"tiers": [{"kind": "disk", "capacity_gb": 1}, {"kind": "cpu", "capacity_gb": 1}]}, "tiers", None),
        ({"metrics": {"enabeld": True}}, "metrics.enabeld", "enabled, host, port"),
        ({"logging": {"format": "xml"}}, "logging.format", "console, json"),
        ({"eviction": "random"}, "eviction", "lru"),
        ({"transports": ["inproc", "pigeon"]}, "transports[1]", "etcd"),
        ({"transports": ["etcd"], "transport_options": {"etcd": {"endpoints": ["https://x:1"]}}}, "transport_options.etcd.endpoints", None),
        ({"transports": ["nats"], "transport_options": {"nats": {"servrs": []}}}, "transport_options.nats.servrs", "servers, timeout_s"),
    ],
)
def test_bad_profile_names_key_and_accepted_values(tmp_path, registry, data, key, accepted):
    profile = write_profile(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        resolve_settings({"DYN_KVBM_PROFILE": profile}, registry=registry)
    assert info.value.source.endswith(key), info.value.source
    assert profile in info.value.source
    if accepted:
        assert accepted in (info.value.accepted or ""), str(info.value)


def test_profile_that_is_not_a_mapping(tmp_path, registry):
    path = tmp_path / "list.yaml"
    path.write_text("- cpu\n- disk\n")
    with pytest.raises(ConfigError, match="YAML mapping"):
        resolve_settings({"DYN_KVBM_PROFILE": str(path)}, registry=registry)
