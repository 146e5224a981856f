"""Installing for use: one extra pulls every bundled distribution, a missing plugin is named by its
distribution, the bundled files can be found from an installed wheel, and the license is shipped.

The whole wheel-only install (build every wheel, a new virtual environment, the README's commands)
takes minutes, so it is a script run by hand: tests/foundation/check_wheel_install.sh."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from kvbm_core.settings.profiles import bundled_profiles, configs_dir

ROOT = Path(__file__).resolve().parents[2]


def project(path: Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def test_the_all_extra_pulls_every_bundled_distribution_of_this_release():
    core = project(ROOT / "pyproject.toml")
    extra = core["optional-dependencies"]["all"]
    plugins = [project(p) for p in sorted((ROOT / "plugins").glob("*/pyproject.toml"))]
    assert plugins
    for plugin in plugins:
        assert f"{plugin['name']}=={plugin['version']}" in extra, plugin["name"]
        assert plugin["version"] == core["version"]
    assert "kvbm-core[cluster,bench]" in extra


def test_the_license_is_shipped_and_matches_the_metadata():
    assert project(ROOT / "pyproject.toml")["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_a_missing_plugin_is_named_by_its_distribution(run_kvbm):
    # A blocked plugin is, to resolving, a plugin that is not installed.
    proc = run_kvbm("config", "show", env={"DYN_KVBM_CPU_CACHE_GB": "1", "DYN_KVBM_DISABLE_PLUGINS": "tier_cpu"})
    assert proc.returncode == 2 and "DYN_KVBM_CPU_CACHE_GB" in proc.stderr
    assert "pip install kvbm-tier-cpu" in proc.stderr and '"kvbm-core[all]"' in proc.stderr
    proc = run_kvbm("config", "show", "--profile", "cpu_disk", env={"DYN_KVBM_DISABLE_PLUGINS": "policy_frequency"})
    assert proc.returncode == 2 and "pip install kvbm-policy-frequency" in proc.stderr


def test_config_path_lists_the_bundled_files(run_kvbm):
    proc = run_kvbm("config", "path", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert Path(doc["configs"]) == configs_dir()
    files = doc["files"]
    assert all(Path(p).is_file() for p in files.values())
    assert {f"profiles/{name}.yaml" for name in bundled_profiles()} <= files.keys()
    assert {"trtllm/kvbm_llm_api_config.yaml", "prometheus/prometheus.yml", "prometheus/grafana/kvbm_dashboard.json"} <= files.keys()
    text = run_kvbm("config", "path").stdout
    assert text.startswith(f"configs   {configs_dir()}") and files["trtllm/kvbm_llm_api_config.yaml"] in text


def test_config_show_says_what_an_unset_disk_directory_means(run_kvbm, tmp_path):
    proc = run_kvbm("config", "show", "--profile", "disk_only")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("disk.directory"))
    assert "the disk tier picks a private per-user directory" in line and line.rstrip().endswith("default")
    doc = json.loads(run_kvbm("config", "show", "--json", "--profile", "disk_only").stdout)
    assert doc["settings"]["disk.directory"] == {"value": None, "source": "default"}
