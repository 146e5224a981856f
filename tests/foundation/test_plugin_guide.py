"""docs/plugins.md stays true: its kinds table is PLUGIN_KINDS, it documents every hook and every
contract member, and its example distribution installs, lists, resolves and passes its own
end-to-end test exactly as the page says.

The example's files are the page's code blocks (each starts with a ``# path`` comment). They are
written into a directory with a ``*.dist-info`` built from the page's ``pyproject.toml``, which
``importlib.metadata`` reads as it reads a pip-installed distribution; the page's pytest file then
runs in a subprocess with that directory on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from kvbm_core import hookspecs
from kvbm_core.errors import ConfigError
from kvbm_core.plugin_kinds import PLUGIN_KINDS
from kvbm_core.registry import Registry
from kvbm_core.storage import TIER_CONTRACTS

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "plugins.md"


@pytest.fixture(scope="module")
def guide() -> str:
    return GUIDE.read_text()


def files(guide: str) -> dict[str, str]:
    """Every code block that starts with a ``# path`` comment, by that path."""
    return {m.group(2): m.group(3) for m in re.finditer(r"```(\w+)\n# (\S+)\n(.*?)```", guide, re.S)}


def table(guide: str, after: str) -> list[list[str]]:
    """Cells of the body rows of the first Markdown table from where ``after`` occurs."""
    lines = guide[guide.index(after):].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| "))
    body = []
    for line in lines[first + 2:]:
        if not line.startswith("| "):
            break
        body.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return body


@pytest.fixture(scope="module")
def site(guide: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example distribution, installed as ``importlib.metadata`` sees installed ones."""
    root = tmp_path_factory.mktemp("site")
    blocks = files(guide)
    for path, source in blocks.items():
        if path.startswith("kvbm_extras/"):
            (root / path).parent.mkdir(exist_ok=True)
            (root / path).write_text(source)
    project = tomllib.loads(blocks["pyproject.toml"])["project"]
    info = root / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    entry_points = "".join(f"{name} = {value}\n" for name, value in project["entry-points"]["kvbm"].items())
    info.joinpath("entry_points.txt").write_text(f"[kvbm]\n{entry_points}")
    return root


def test_kinds_table_is_plugin_kinds(guide):
    rows = table(guide, "| kind | hook |")
    assert rows == [[kind.name, f"`{kind.hook_name}()`", f"`{kind.base.__name__}`", f"`{kind.selected_as}`", kind.checked]
                    for kind in PLUGIN_KINDS]


def test_readme_type_hook_rows_agree_with_plugin_kinds():
    rows = {row[0]: row for row in table((ROOT / "README.md").read_text(), "| hook | returns | selected in a profile as |")}
    for kind in PLUGIN_KINDS:
        assert rows[f"`{kind.hook_name}()`"][2] == f"`{kind.selected_as}`"


def test_every_hook_and_contract_member_is_documented(guide):
    hooks = {name for name in dir(hookspecs) if name.startswith("kvbm_")}
    documented = set(re.findall(r"`(kvbm_\w+)\(", guide))
    assert documented == hooks
    for contract in TIER_CONTRACTS.values():
        rows = table(guide, f"**{contract.level.name.capitalize()} level: `{contract.base.__name__}`.**")
        described = {re.match(r"`(\w+)", row[0]).group(1) for row in rows}
        assert described == set(contract.members()), contract.level


def test_example_is_listed_as_the_guide_shows(guide, site, run_kvbm):
    proc = run_kvbm("plugins", pythonpath=site)
    assert proc.returncode == 0, proc.stderr
    shown = re.search(r"Its row:\n\n```text\n(.*)\n```", guide).group(1)
    (row,) = [line for line in proc.stdout.splitlines() if line.startswith("extras ")]
    assert row.split() == shown.split()


@pytest.mark.parametrize("name, kinds, disk_filter", [
    ("ram_mru.yaml", ["ram"], None),
    ("ram_file.yaml", ["ram", "plainfile"], "sampled"),
])
def test_example_profiles_select_the_plugins(guide, site, run_kvbm, tmp_path, name, kinds, disk_filter):
    profile = tmp_path / name
    profile.write_text(files(guide)[name])
    proc = run_kvbm("config", "show", "--json", "--profile", str(profile), pythonpath=site)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [t["kind"] for t in doc["tiers"]] == kinds
    assert doc["pipeline"]["disk_filter"] == disk_filter
    assert all(t["distribution"] == "kvbm-extras" for t in doc["tiers"])


def test_example_passes_its_end_to_end_test(guide, site, kvbm_env, tmp_path):
    test_file = tmp_path / "tests" / "test_kvbm_extras.py"
    test_file.parent.mkdir()
    test_file.write_text(files(guide)["tests/test_kvbm_extras.py"])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                          cwd=tmp_path, env=kvbm_env(pythonpath=site), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout


def test_example_filter_refuses_a_bad_option_naming_its_key(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    import kvbm_extras

    registry = Registry(load_entry_points=False)
    registry.register(kvbm_extras, "extras", "kvbm-extras", "0.1.0")
    with pytest.raises(ConfigError, match=r"^disk_offload_filter.options.one_in: got 0 \(accepted: a whole number >= 1\)$"):
        registry.create("filter", "sampled", "disk_offload_filter.name", {"one_in": 0})
    admitted = registry.create("filter", "sampled", "disk_offload_filter.name", {"one_in": 2}).admit(
        np.array([[1, 2], [3, 5], [7, 8]], np.uint64))
    assert admitted.tolist() == [True, False, True]
