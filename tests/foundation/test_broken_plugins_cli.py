"""Broken plugins, installed as real distributions: ``kvbm plugins`` lists everything, marks the broken
one with its reason and exits 2; the commands that need the plugin types stop with one line.

``fake_distribution`` writes the module and its ``*.dist-info`` into a directory on ``PYTHONPATH``,
which ``importlib.metadata`` reads exactly as it reads a pip-installed distribution.
"""

from __future__ import annotations

import json
import re

import yaml

HEALTHY = ("kvbm-core", "kvbm-tier-cpu", "kvbm-tier-disk", "kvbm-tier-gds", "kvbm-policy-frequency", "kvbm-example-fifo")

BARE_TIER = """
from kvbm_core import hookimpl
from kvbm_core.interfaces import StorageTier, TierLevel

class BareTier(StorageTier):
    '''A host tier written against StorageTier alone: nothing for the engine to copy through.'''
    name = "bare"
    level = TierLevel.HOST

    def close(self):
        pass

@hookimpl
def kvbm_tier_types():
    return [BareTier]
"""


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvbm: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def listed(proc) -> dict[str, list[str]]:
    """Rows of the ``kvbm plugins`` table by plugin name (columns split on runs of 2+ spaces)."""
    header, *rows = proc.stdout.splitlines()
    assert re.split(r"\s{2,}", header.strip()) == ["NAME", "PROVIDES", "DISTRIBUTION", "VERSION", "ENABLED"]
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", row.strip()) for row in rows)}


def test_a_tier_missing_its_levels_members_fails_kvbm_plugins_with_one_line(run_kvbm, fake_distribution, tmp_path):
    site = fake_distribution("kvbm-bare-tier", "kvbm_bare_tier", BARE_TIER)
    proc = run_kvbm("plugins", pythonpath=site)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert line == ("kvbm: error: plugin distribution 'kvbm-bare-tier': tier 'bare' (BareTier) is a HOST tier but "
                    "does not subclass HostStorage, whose members it must provide: close, slots, context, pinned, "
                    "segment_slots")
    rows = listed(proc)
    assert rows["kvbm_bare_tier"][1].startswith("BROKEN: tier 'bare' (BareTier) is a HOST tier")
    assert rows["kvbm_bare_tier"][-1] == "no (broken)"
    assert {row[2] for row in rows.values() if row[-1] == "yes"} == set(HEALTHY), "the others are listed as usual"

    profile = tmp_path / "bare.yaml"
    profile.write_text(yaml.safe_dump({"tiers": [{"kind": "bare", "capacity_gb": 1}]}))
    for command in (("config", "show"), ("doctor",)):
        proc = run_kvbm(*command, env={"DYN_KVBM_PROFILE": str(profile)}, pythonpath=site)
        assert proc.returncode == 2
        assert one_error_line(proc) == line


def test_a_plugin_calling_sys_exit_at_import_is_listed_as_broken(run_kvbm, fake_distribution):
    site = fake_distribution("kvbm-exits", "kvbm_exits", "import sys\nsys.exit(3)\n")
    proc = run_kvbm("plugins", "--json", pythonpath=site)
    assert proc.returncode == 2
    assert one_error_line(proc) == ("kvbm: error: plugin distribution 'kvbm-exits': entry point kvbm_exits = "
                                    "kvbm_exits failed to import: SystemExit(3)")
    plugins = {p["name"]: p for p in json.loads(proc.stdout)["plugins"]}
    assert plugins["kvbm_exits"]["status"] == "broken" and plugins["kvbm_exits"]["enabled"] is False
    assert plugins["kvbm_exits"]["problem"] == "entry point kvbm_exits = kvbm_exits failed to import: SystemExit(3)"
    assert plugins["tier_cpu"]["status"] == "ok" and plugins["tier_cpu"]["provides"] == {"tier": ["cpu"]}


def test_every_broken_plugin_is_listed_with_its_reason_and_blocking_them_exits_0(run_kvbm, fake_distribution):
    fake_distribution("kvbm-missing-dep", "kvbm_missing_dep", "import kvbm_dependency_that_is_not_installed\n")
    fake_distribution("kvbm-wrong-type", "kvbm_wrong_type",
                      "from kvbm_core import hookimpl\n\n@hookimpl\ndef kvbm_offload_filters():\n    return [dict]\n")
    site = fake_distribution("kvbm-typo", "kvbm_typo",
                             "from kvbm_core import hookimpl\n\n@hookimpl\ndef kvbm_tier_typs():\n    return []\n")
    proc = run_kvbm("plugins", pythonpath=site)
    assert proc.returncode == 2
    rows = listed(proc)
    assert "ModuleNotFoundError" in rows["kvbm_missing_dep"][1]
    assert "returned <class 'dict'>, which is not a subclass of OffloadFilter" in rows["kvbm_wrong_type"][1]
    assert "unknown hook(s) kvbm_tier_typs" in rows["kvbm_typo"][1]
    errors = proc.stderr.strip().splitlines()
    assert [e.split("'")[1] for e in errors] == ["kvbm-missing-dep", "kvbm-typo", "kvbm-wrong-type"]

    blocked = run_kvbm("plugins", env={"DYN_KVBM_DISABLE_PLUGINS": "kvbm_missing_dep,kvbm_wrong_type,kvbm_typo"},
                       pythonpath=site)
    assert blocked.returncode == 0 and not blocked.stderr
    assert listed(blocked)["kvbm_typo"][-1] == "no (blocked)"
