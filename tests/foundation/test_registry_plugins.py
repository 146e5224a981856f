"""The registry in-process: entry points, clashes, wrong types, hook typos, blocking, events."""

from __future__ import annotations

import types

import pytest

from kvbm_core import hookimpl
from kvbm_core.errors import PluginError
from kvbm_core.interfaces import EvictionPolicy, StorageTier, TierLevel
from kvbm_core.registry import Registry, blocked_from_environment

FOUR_PLUGINS = {"kvbm-tier-cpu", "kvbm-tier-disk", "kvbm-tier-gds", "kvbm-policy-frequency"}


def plugin_module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        fn.__name__ = hook_name
        setattr(module, hook_name, hookimpl(fn))
    return module


class RamTier(StorageTier):
    name = "ram"
    level = TierLevel.HOST

    def close(self) -> None:
        pass


def test_entry_points_load_core_the_four_plugins_and_the_example():
    registry = Registry()
    distributions = {p.distribution for p in registry.plugins}
    assert distributions >= FOUR_PLUGINS | {"kvbm-core", "kvbm-example-fifo"}
    assert set(registry.types("tier")) >= {"cpu", "disk", "gds"}
    assert set(registry.types("eviction")) >= {"lru", "fifo"}
    assert set(registry.types("transport")) >= {"inproc", "etcd", "nats"}
    assert "frequency" in registry.types("filter")
    assert registry.types("eviction")["fifo"].distribution == "kvbm-example-fifo"
    core = registry.contributions("core")
    assert core["eviction"] == ["lru"] and core["transport"] == ["etcd", "inproc", "nats"]
    assert "kvbm_request_finished" in core["events"], "the metrics exporter subscribes through core"


def test_type_name_claimed_twice_names_both_distributions():
    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("a", kvbm_tier_types=lambda: [RamTier]), "a", "kvbm-ram-a", "1")
    registry.register(plugin_module("b", kvbm_tier_types=lambda: [RamTier]), "b", "kvbm-ram-b", "1")
    with pytest.raises(PluginError) as info:
        registry.types("tier")
    assert "kvbm-ram-a" in str(info.value) and "kvbm-ram-b" in str(info.value)
    assert "DYN_KVBM_DISABLE_PLUGINS" in str(info.value)


def test_wrong_type_names_the_distribution():
    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("bad", kvbm_eviction_policies=lambda: [RamTier]), "bad", "kvbm-bad", "1")
    with pytest.raises(PluginError, match="kvbm-bad.*not a subclass of EvictionPolicy"):
        registry.types("eviction")


def test_type_without_name_and_raising_hook_are_errors():
    class Nameless(EvictionPolicy):
        def add(self, slot, priority, tick): ...
        def discard(self, slot): ...
        def victim(self): ...
        def __len__(self): return 0

    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("n", kvbm_eviction_policies=lambda: [Nameless]), "n", "kvbm-nameless", "1")
    with pytest.raises(PluginError, match="kvbm-nameless.*no string 'name'"):
        registry.types("eviction")

    def boom():
        raise RuntimeError("broken")

    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("r", kvbm_transports=boom), "r", "kvbm-raises", "1")
    with pytest.raises(PluginError, match="kvbm-raises.*broken"):
        registry.types("transport")


def test_misspelt_hook_is_an_error_naming_the_distribution():
    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("typo", kvbm_tier_type=lambda: [RamTier]), "typo", "kvbm-typo", "1")
    with pytest.raises(PluginError, match="kvbm-typo.*kvbm_tier_type"):
        registry.check_hook_names()


def test_hook_with_wrong_arguments_is_refused_at_registration():
    def stored(tier, rout):  # "rout" is not an argument of kvbm_blocks_stored
        pass

    registry = Registry(load_entry_points=False)
    with pytest.raises(PluginError, match="kvbm-wrong-args"):
        registry.register(plugin_module("w", kvbm_blocks_stored=stored), "w", "kvbm-wrong-args", "1")


def test_blocked_plugins_are_listed_disabled_and_contribute_nothing():
    assert blocked_from_environment({"DYN_KVBM_DISABLE_PLUGINS": " tier_gds, example_fifo ,"}) == {"tier_gds", "example_fifo"}
    registry = Registry(blocked={"tier_gds", "example_fifo"})
    infos = {p.name: p for p in registry.plugins}
    assert infos["tier_gds"].enabled is False and infos["tier_gds"].distribution == "kvbm-tier-gds"
    assert "gds" not in registry.types("tier") and "fifo" not in registry.types("eviction")
    assert infos["tier_cpu"].enabled is True


def test_notify_calls_every_subscriber_even_after_one_fails():
    seen = []

    def failing(route, num_blocks, num_bytes, seconds):
        raise RuntimeError("subscriber bug")

    def recording(route, num_blocks, num_bytes, seconds):
        seen.append((route, num_blocks, num_bytes, seconds))

    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("f", kvbm_blocks_offloaded=failing), "f", "kvbm-f", "1")
    registry.register(plugin_module("g", kvbm_blocks_offloaded=recording), "g", "kvbm-g", "1")
    registry.notify("kvbm_blocks_offloaded", route="d2h", num_blocks=2, num_bytes=64, seconds=0.5)
    assert seen == [("d2h", 2, 64, 0.5)]
    with pytest.raises(TypeError, match="num_bytes"):
        registry.notify("kvbm_blocks_offloaded", route="d2h", num_blocks=2, seconds=0.5)
