"""Every value is checked when settings are resolved, so that ``kvbm config show``, ``kvbm doctor`` and
the engine reject the same things: misspelt variables, unknown plugin names and options, values that
only failed later inside the engine, sizes this machine cannot hold, and YAML errors, each as one line."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import yaml
from pydantic_settings import EnvSettingsSource

from kvbm_core.errors import ConfigError
from kvbm_core.registry import Registry
from kvbm_core.settings import resolve_settings
from kvbm_core.settings.environment import SeedEnvironment
from kvbm_core.settings.limits import MIN_BLOCK_BYTES, filesystem_bytes, physical_memory_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(blocked=())


def profile(tmp_path: Path, data: dict | str) -> str:
    path = tmp_path / "profile.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def refused(environ: dict, registry: Registry) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        resolve_settings(environ, registry=registry)
    assert "\n" not in str(info.value)
    return info.value


# ------------------------------------------------------------ finding 2: nothing is silent
def test_a_misspelt_variable_is_an_error_naming_the_closest_one(registry):
    error = refused({"DYN_KVBM_CPU_CACHE_GIGS": "4"}, registry)
    assert error.source == "DYN_KVBM_CPU_CACHE_GIGS"
    assert "did you mean DYN_KVBM_CPU_CACHE_GB?" in str(error)


def test_dynamo_variables_kvbm_does_not_read_are_notices(registry, log_capture):
    environ = {
        "DYN_KVBM_CPU_CACHE_GB": "1",
        "DYN_KVBM_MAX_CONCURRENT_TRANSFERS": "8",
        "DYN_KVBM_LEADER_ZMQ_HOST": "10.0.0.1",
        "DYN_KVBM_OBJECT_BUCKET": "kv",
    }
    resolved = resolve_settings(environ, registry=registry)
    assert [n.split()[0] for n in resolved.notices] == ["DYN_KVBM_LEADER_ZMQ_HOST", "DYN_KVBM_MAX_CONCURRENT_TRANSFERS", "DYN_KVBM_OBJECT_BUCKET"]
    assert all("does not read" in n for n in resolved.notices)
    logged = log_capture.getvalue()
    assert "DYN_KVBM_LEADER_ZMQ_HOST" in logged and "ZMQ" in logged, "the engine logs each notice"
    quiet = resolve_settings(environ, registry=registry, log_notices=False)
    assert quiet.notices == resolved.notices


def test_unknown_plugin_names_in_disable_plugins_are_an_error(registry):
    error = refused({"DYN_KVBM_DISABLE_PLUGINS": "tier_gds,tier_gdss"}, registry)
    assert error.source == "DYN_KVBM_DISABLE_PLUGINS" and "'tier_gdss'" in str(error) and "tier_gds" in error.accepted


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"cost_model": {"bandwidth_gbps": {"cpuu": 50}}}, "cost_model.bandwidth_gbps.cpuu"),
        ({"disk_offload_filter": {"options": {"min_frequncy": 3}}}, "disk_offload_filter.options.min_frequncy"),
        ({"disk_offload_filter": {"options": {"decay_interval_s": 0}}}, "disk_offload_filter.options.decay_interval_s"),
    ],
)
def test_unknown_option_keys_are_errors(tmp_path, registry, data, key):
    data = {"tiers": [{"kind": "cpu", "capacity_gb": 0.01}, {"kind": "disk", "capacity_gb": 0.01}], "disk": {"directory": str(tmp_path)}, **data}
    error = refused({"DYN_KVBM_PROFILE": profile(tmp_path, data)}, registry)
    assert error.source.endswith(key), error.source


PICKY_POLICY = """
from kvbm_core import hookimpl
from kvbm_core.errors import ConfigError
from kvbm_core.interfaces import EvictionPolicy

class Picky(EvictionPolicy):
    name = "picky"

    @classmethod
    def validate_options(cls, options, key):
        for name in options:
            if name != "depth":
                raise ConfigError(f"{key}.{name}", "unknown option", ["depth"])

    def add(self, slot, priority, tick): pass
    def discard(self, slot): pass
    def victim(self): return None
    def __len__(self): return 0

@hookimpl
def kvbm_eviction_policies():
    return [Picky]
"""


def test_eviction_options_are_checked_by_the_policy_when_resolving(run_kvbm, fake_distribution, tmp_path):
    site = fake_distribution("kvbm-picky", "kvbm_picky", PICKY_POLICY)
    good = profile(tmp_path, {"tiers": [{"kind": "cpu", "capacity_gb": 0.01}], "eviction": "picky", "eviction_options": {"depth": 2}})
    assert run_kvbm("config", "show", env={"DYN_KVBM_PROFILE": good}, pythonpath=site).returncode == 0
    (tmp_path / "bad").mkdir()
    bad = profile(tmp_path / "bad", {"tiers": [{"kind": "cpu", "capacity_gb": 0.01}], "eviction": "picky", "eviction_options": {"colour": "red"}})
    for command in (("config", "show"), ("doctor",)):
        proc = run_kvbm(*command, env={"DYN_KVBM_PROFILE": bad}, pythonpath=site)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert "eviction_options.colour" in proc.stderr


# ------------------------------------------------- finding 3: accepted, then fatal no more
@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, True, "50"])
def test_cost_model_bandwidths_are_finite_positive_numbers(tmp_path, registry, value):
    data = {"tiers": [{"kind": "cpu", "capacity_gb": 0.01}], "cost_model": {"bandwidth_gbps": {"cpu": value}}}
    error = refused({"DYN_KVBM_PROFILE": profile(tmp_path, data)}, registry)
    assert error.source.endswith("cost_model.bandwidth_gbps.cpu"), error.source


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"tiers": [{"kind": "cpu", "capacity_gb": True}]}, "tiers[0].capacity_gb"),
        ({"tiers": [{"kind": "cpu", "capacity_gb": "4"}]}, "tiers[0].capacity_gb"),
        ({"tiers": [{"kind": "cpu", "capacity_gb": 1}], "metrics": {"enabled": 1}}, "metrics.enabled"),
        ({"tiers": [{"kind": "cpu", "capacity_gb": 1}], "disk": {"disable_o_direct": "yes"}}, "disk.disable_o_direct"),
        ({"tiers": [{"kind": "cpu", "num_blocks": 1.5}]}, "tiers[0].num_blocks"),
        ({"tiers": [{"kind": "cpu", "capacity_gb": 1}], "leader_worker_init_timeout_secs": 1e308}, "leader_worker_init_timeout_secs"),
        ({"tiers": [{"kind": "cpu", "capacity_gb": 1}], "cache_stats": {"max_requests": 10**23}}, "cache_stats.max_requests"),
        ({"tiers": [{"kind": "cpu", "capacity_gb": 1}], "metrics": {"host": "every interface"}}, "metrics.host"),
    ],
)
def test_yaml_values_keep_their_type_and_range(tmp_path, registry, data, key):
    error = refused({"DYN_KVBM_PROFILE": profile(tmp_path, data)}, registry)
    assert error.source.endswith(key), error.source


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", "1e308"),
        ("DYN_KVBM_CACHE_STATS_MAX_REQUESTS", str(10**23)),
        ("DYN_KVBM_METRICS_HOST", "localhost:80"),
        ("DYN_KVBM_CPU_CACHE_GB", "true"),
    ],
)
def test_variables_out_of_range_name_the_variable(registry, variable, value):
    error = refused({"DYN_KVBM_CPU_CACHE_GB": "0.01", variable: value}, registry)
    assert error.source == variable and error.accepted


def test_host_tier_larger_than_physical_memory_is_refused(registry):
    memory_gb = physical_memory_bytes() / 1e9
    for value in ("1e300", f"{2 * memory_gb:.0f}"):
        error = refused({"DYN_KVBM_CPU_CACHE_GB": value}, registry)
        assert error.source == "DYN_KVBM_CPU_CACHE_GB" and "physical memory" in str(error)
    error = refused({"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": str(10**23)}, registry)
    assert error.source == "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"
    fits = physical_memory_bytes() // MIN_BLOCK_BYTES
    assert resolve_settings({"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": str(fits)}, registry=registry).settings.tier("cpu").num_blocks == fits
    assert resolve_settings({"DYN_KVBM_CPU_CACHE_GB": f"{memory_gb / 2:.3f}"}, registry=registry).settings.tier("cpu")


def test_disk_tier_larger_than_its_filesystem_is_refused(tmp_path, registry):
    too_big = f"{2 * filesystem_bytes(str(tmp_path)) / 1e9:.0f}"
    error = refused({"DYN_KVBM_DISK_CACHE_GB": too_big, "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path / "not" / "yet")}, registry)
    assert error.source == "DYN_KVBM_DISK_CACHE_GB" and "filesystem that holds" in str(error)
    assert not (tmp_path / "not").exists(), "resolving creates nothing"
    error = refused({"DYN_KVBM_DISK_CACHE_GB": "1e300"}, registry)  # no directory: the tier picks one
    assert error.source == "DYN_KVBM_DISK_CACHE_GB" and "largest file" in str(error)
    data = {"tiers": [{"kind": "disk", "num_blocks": 10**23}], "disk": {"directory": str(tmp_path)}}
    error = refused({"DYN_KVBM_PROFILE": profile(tmp_path, data)}, registry)
    assert error.source.endswith("tiers[0].num_blocks")


def test_malformed_yaml_is_one_line_with_its_position(tmp_path, registry):
    error = refused({"DYN_KVBM_PROFILE": profile(tmp_path, "tiers:\n  - kind: cpu\n    capacity_gb: [4\n")}, registry)
    assert "not valid YAML: line 4, column 1" in str(error), str(error)
    pairs = refused({"DYN_KVBM_PROFILE": profile(tmp_path, "- [tiers, []]\n")}, registry)
    assert "YAML mapping" in str(pairs)


def test_a_cli_command_prints_one_line_for_each_refusal(run_kvbm, tmp_path):
    broken = profile(tmp_path, "tiers: [\n")
    cases = [
        {"DYN_KVBM_CPU_CACHE_GIGS": "4"},
        {"DYN_KVBM_CPU_CACHE_GB": "1e300"},
        {"DYN_KVBM_PROFILE": broken},
    ]
    for env in cases:
        for command in (("config", "show"), ("doctor",)):
            proc = run_kvbm(*command, env=env)
            assert proc.returncode == 2, (env, proc.stdout, proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("kvbm: error: "), proc.stderr


# --------------------------------------------------- finding 7: the library does the reading
def test_variables_are_read_by_pydantic_settings_from_the_given_mapping(monkeypatch):
    sources = SeedEnvironment.settings_customise_sources(SeedEnvironment, *[None] * 4)
    assert len(sources) == 1 and isinstance(sources[0], EnvSettingsSource)
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "2")
    assert SeedEnvironment().cpu_cache_gb == 2.0
    assert SeedEnvironment.load({"dyn_kvbm_cpu_cache_gb": " 3 "}).cpu_cache_gb == 3.0
    assert SeedEnvironment.load().cpu_cache_gb == 2.0


def test_yaml_is_a_declared_dependency_not_an_unused_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [d.split(">")[0].split("=")[0].strip().lower() for d in project["dependencies"]]
    assert "pyyaml" in names and "pydantic-settings" in names
    assert not any("[yaml]" in d for d in project["dependencies"])
