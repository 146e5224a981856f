"""The README stays true: its plugin examples install, list and resolve as it says, its
configuration table covers every variable, and its hook tables cover every hook."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvbm_core import hookspecs
from kvbm_core.registry import DISABLE_VARIABLE
from kvbm_core.settings.environment import SeedEnvironment, variable_name

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text()


def code_block(text: str, after: str, language: str, index: int = 0) -> str:
    section = text[text.index(after) :]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)[index]


def test_tier_plugin_guide_works_as_written(readme, run_kvbm, fake_distribution, tmp_path):
    source = code_block(readme, "### 1. Write it", "python")
    toml = code_block(readme, "### 1. Write it", "toml")
    entry_point, module = re.search(r'^(\w+) = "(\w+)"$', toml, re.M).groups()
    distribution = re.search(r'^name = "([\w-]+)"$', toml, re.M).group(1)
    site = fake_distribution(distribution, module, source, entry_point=entry_point, version="0.1.0")

    listed = run_kvbm("plugins", "--json", pythonpath=site)
    assert listed.returncode == 0, listed.stderr
    plugin = next(p for p in json.loads(listed.stdout)["plugins"] if p["name"] == entry_point)
    assert plugin["provides"] == {"tier": ["example_ram"]} and plugin["distribution"] == distribution

    profile = tmp_path / "my_profile.yaml"
    profile.write_text(code_block(readme, "### 3. Select it", "yaml"))
    shown = run_kvbm("config", "show", "--json", env={"DYN_KVBM_PROFILE": str(profile)}, pythonpath=site)
    assert shown.returncode == 0, shown.stderr
    (tier,) = json.loads(shown.stdout)["tiers"]
    assert (tier["kind"], tier["capacity_gb"], tier["level"]) == ("example_ram", 2.0, "host")
    assert tier["sources"]["capacity_gb"] == f"profile:{profile}"


def test_tier_example_allocates_its_slots(readme):
    import torch

    from kvbm_core.interfaces import TierContext
    from kvbm_core.layout import BlockLayout
    from kvbm_core.settings import TierSpec

    namespace: dict = {}
    exec(compile(code_block(readme, "### 1. Write it", "python"), "README", "exec"), namespace)
    pool = torch.zeros(4, 2, 2, 64, dtype=torch.bfloat16)
    layout = BlockLayout.from_pool(pool, tokens_per_block=16)
    tier = namespace["RamTier"](TierContext(TierSpec(kind="example_ram", num_blocks=3), layout, num_slots=3, rank=0, world_size=1, namespace=b"\0" * 16))
    assert tuple(tier.slots.shape) == (3, layout.bytes_per_block) and tier.slots.dtype == torch.uint8
    tier.close()


def test_event_plugin_example_registers(readme, run_kvbm, fake_distribution):
    source = code_block(readme, "An event plugin in ten lines", "python")
    site = fake_distribution("kvbm-kv-events", "kvbm_kv_events", source)
    listed = run_kvbm("plugins", "--json", pythonpath=site)
    assert listed.returncode == 0, listed.stderr
    plugin = next(p for p in json.loads(listed.stdout)["plugins"] if p["name"] == "kvbm_kv_events")
    assert plugin["provides"] == {"events": ["kvbm_blocks_stored", "kvbm_pipeline_built", "kvbm_pipeline_closed"]}


def test_configuration_table_covers_every_variable(readme):
    table = readme[readme.index("| variable | YAML key |") :]
    documented = set(re.findall(r"^\| `(DYN_KVBM_\w+)`", table, re.M))
    expected = {variable_name(f) for f in SeedEnvironment.model_fields} | {DISABLE_VARIABLE}
    assert documented == expected


def test_hook_tables_cover_every_hook(readme):
    hooks = {name for name in dir(hookspecs) if name.startswith("kvbm_")}
    documented = set(re.findall(r"^\| `(kvbm_\w+)\(", readme, re.M))
    assert documented == hooks
