"""The ``kvbm`` console script, run for real in a subprocess: plugins, config show, exit codes.

Plugins that clash or break are real distributions: ``fake_distribution`` writes a module and its
``*.dist-info`` into a directory on ``PYTHONPATH``, which ``importlib.metadata`` reads exactly as it
reads a pip-installed distribution (see tests/conftest.py).
"""

from __future__ import annotations

import json

import pytest
import yaml

FOUR = ("kvbm-tier-cpu", "kvbm-tier-disk", "kvbm-tier-gds", "kvbm-policy-frequency")


def assert_config_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kvbm: error: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ------------------------------------------------------------------------------------ plugins
def test_plugins_lists_the_four_plugins_and_the_example(run_kvbm):
    proc = run_kvbm("plugins")
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["NAME", "PROVIDES", "DISTRIBUTION", "VERSION", "ENABLED"]
    by_distribution = {row.split()[-3]: row for row in rows}
    for distribution in (*FOUR, "kvbm-core", "kvbm-example-fifo"):
        assert distribution in by_distribution, proc.stdout
        assert by_distribution[distribution].endswith("yes")
    assert "tier: cpu" in by_distribution["kvbm-tier-cpu"]
    assert "filter: frequency" in by_distribution["kvbm-policy-frequency"]
    assert "eviction: fifo" in by_distribution["kvbm-example-fifo"]
    assert "0.1.0" in by_distribution["kvbm-example-fifo"]


def test_plugins_json_and_blocking(run_kvbm):
    proc = run_kvbm("plugins", "--json", env={"DYN_KVBM_DISABLE_PLUGINS": "tier_gds"})
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)["plugins"]}
    assert plugins["tier_gds"]["enabled"] is False and plugins["tier_gds"]["provides"] == {}
    assert plugins["tier_disk"]["provides"] == {"tier": ["disk"]}
    assert plugins["example_fifo"]["distribution"] == "kvbm-example-fifo"


# -------------------------------------------------------------------------------- config show
def test_config_show_environment_over_profile(run_kvbm):
    proc = run_kvbm("config", "show", "--json", env={"DYN_KVBM_PROFILE": "cpu_disk", "DYN_KVBM_CPU_CACHE_GB": "2"})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["profile"] == "cpu_disk"
    cpu, disk = doc["tiers"]
    assert (cpu["kind"], cpu["capacity_gb"], cpu["num_blocks"]) == ("cpu", 2.0, None)
    assert cpu["sources"]["capacity_gb"] == "env:DYN_KVBM_CPU_CACHE_GB"
    assert cpu["sources"]["kind"] == "profile:cpu_disk"
    assert (disk["kind"], disk["capacity_gb"]) == ("disk", 8.0)
    assert disk["sources"]["capacity_gb"] == "profile:cpu_disk"
    assert doc["pipeline"]["offload"] == ["d2h", "h2disk", "d2disk"] and doc["pipeline"]["disk_filter"] == "frequency"
    assert doc["settings"]["metrics.port"] == {"value": 6880, "source": "default"}


def test_config_show_text_names_every_source(run_kvbm, tmp_path):
    profile = tmp_path / "mine.yaml"
    profile.write_text(yaml.safe_dump({"tiers": [{"kind": "disk", "capacity_gb": 3}], "metrics": {"port": 7100}}))
    proc = run_kvbm("config", "show", "--profile", str(profile), env={"DYN_KVBM_METRICS": "true"})
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[3:]}
    assert rows["tiers.disk.capacity_gb"][1:] == ["3.0", f"profile:{profile}"]
    assert rows["metrics.port"][1:] == ["7100", f"profile:{profile}"]
    assert rows["metrics.enabled"][1:] == ["true", "env:DYN_KVBM_METRICS"]
    assert rows["eviction"][1:] == ["lru", "default"]
    assert "offload d2h (host staging), h2disk (disk), d2disk (disk, when the host is full)" in proc.stdout


def test_example_plugin_selected_by_name_in_a_profile(run_kvbm, tmp_path):
    profile = tmp_path / "fifo.yaml"
    profile.write_text(yaml.safe_dump({"tiers": [{"kind": "cpu", "capacity_gb": 1}], "eviction": "fifo"}))
    proc = run_kvbm("config", "show", "--json", env={"DYN_KVBM_PROFILE": str(profile)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["settings"]["eviction"] == {"value": "fifo", "source": f"profile:{profile}"}

    blocked = run_kvbm("config", "show", env={"DYN_KVBM_PROFILE": str(profile), "DYN_KVBM_DISABLE_PLUGINS": "example_fifo"})
    assert_config_error(blocked, "eviction", "unknown eviction 'fifo'")


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("value", ["abc", "-1"])
def test_bad_cpu_cache_gb_exits_2_naming_the_variable(run_kvbm, value):
    for command in (("config", "show"), ("doctor",)):
        proc = run_kvbm(*command, env={"DYN_KVBM_CPU_CACHE_GB": value})
        assert_config_error(proc, "DYN_KVBM_CPU_CACHE_GB", repr(value), "accepted")


def test_unknown_tier_kind_exits_2_naming_the_key(run_kvbm, tmp_path):
    profile = tmp_path / "floppy.yaml"
    profile.write_text(yaml.safe_dump({"tiers": [{"kind": "floppy", "capacity_gb": 1}]}))
    proc = run_kvbm("config", "show", env={"DYN_KVBM_PROFILE": str(profile)})
    assert_config_error(proc, "tiers[0].kind", "'floppy'", "cpu, disk, gds")


def test_missing_profile_file_exits_2(run_kvbm, tmp_path):
    missing = tmp_path / "absent.yaml"
    proc = run_kvbm("config", "show", env={"DYN_KVBM_PROFILE": str(missing)})
    assert_config_error(proc, "DYN_KVBM_PROFILE", str(missing), "does not exist")
    proc = run_kvbm("config", "show", "--profile", "no_such_bundle")
    assert_config_error(proc, "--profile", "no_such_bundle", "cpu_disk")


CLASHING_TIER = """
from kvbm_core import hookimpl
from kvbm_core.interfaces import StorageTier, TierLevel

class OtherCpuTier(StorageTier):
    name = "cpu"
    level = TierLevel.HOST

    def close(self):
        pass

@hookimpl
def kvbm_tier_types():
    return [OtherCpuTier]
"""


def test_two_distributions_claiming_one_tier_name_exit_2(run_kvbm, fake_distribution):
    site = fake_distribution("kvbm-rival-cpu", "kvbm_rival_cpu", CLASHING_TIER, entry_point="rival_cpu")
    for command in (("plugins",), ("config", "show")):
        proc = run_kvbm(*command, env={"DYN_KVBM_CPU_CACHE_GB": "1"}, pythonpath=site)
        assert_config_error(proc, "'cpu'", "kvbm-rival-cpu", "kvbm-tier-cpu")
    # Blocking one of them by name resolves the clash.
    proc = run_kvbm("config", "show", "--json", env={"DYN_KVBM_CPU_CACHE_GB": "1", "DYN_KVBM_DISABLE_PLUGINS": "rival_cpu"}, pythonpath=site)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tiers"][0]["distribution"] == "kvbm-tier-cpu"


def test_two_distributions_claiming_one_plugin_name_exit_2(run_kvbm, fake_distribution):
    site = fake_distribution("kvbm-impostor", "kvbm_impostor", "", entry_point="tier_cpu")
    proc = run_kvbm("plugins", pythonpath=site)
    assert_config_error(proc, "'tier_cpu'", "kvbm-impostor", "kvbm-tier-cpu")


def test_plugin_that_fails_to_import_exits_2_naming_it(run_kvbm, fake_distribution):
    site = fake_distribution("kvbm-broken", "kvbm_broken", "import kvbm_dependency_that_is_not_installed\n")
    proc = run_kvbm("plugins", pythonpath=site)
    assert_config_error(proc, "kvbm-broken", "failed to import", "kvbm_dependency_that_is_not_installed")


def test_plugin_returning_the_wrong_type_exits_2_naming_it(run_kvbm, fake_distribution):
    source = "from kvbm_core import hookimpl\n\n@hookimpl\ndef kvbm_tier_types():\n    return [dict]\n"
    site = fake_distribution("kvbm-wrong-type", "kvbm_wrong_type", source)
    proc = run_kvbm("config", "show", pythonpath=site)
    assert_config_error(proc, "kvbm-wrong-type", "not a subclass of StorageTier")


def test_plugin_with_misspelt_hook_exits_2_naming_it(run_kvbm, fake_distribution):
    source = "from kvbm_core import hookimpl\n\n@hookimpl\ndef kvbm_tier_typs():\n    return []\n"
    site = fake_distribution("kvbm-typo", "kvbm_typo", source)
    proc = run_kvbm("plugins", pythonpath=site)
    assert_config_error(proc, "kvbm-typo", "kvbm_tier_typs")


def test_usage_error_exits_2(run_kvbm):
    assert run_kvbm("frobnicate").returncode == 2
    assert run_kvbm("config").returncode == 2
    version = run_kvbm("--version")
    assert version.returncode == 0 and version.stdout.startswith("kvbm ")
