"""The third-party example plugin (tests/example_plugin), installed by ./dev like any distribution."""

from __future__ import annotations

import importlib.metadata as metadata

import yaml

from kvbm_core.registry import Registry
from kvbm_core.settings import resolve_settings


def test_installed_as_a_distribution_with_an_entry_point():
    dist = metadata.distribution("kvbm-example-fifo")
    (entry_point,) = [ep for ep in dist.entry_points if ep.group == "kvbm"]
    assert (entry_point.name, entry_point.value) == ("example_fifo", "kvbm_example_fifo")


def test_fifo_selected_in_a_profile_evicts_in_arrival_order(tmp_path):
    registry = Registry()
    profile = tmp_path / "fifo.yaml"
    profile.write_text(yaml.safe_dump({"tiers": [{"kind": "cpu", "capacity_gb": 1}], "eviction": "fifo", "eviction_options": {}}))
    settings = resolve_settings({"DYN_KVBM_PROFILE": str(profile)}, registry=registry).settings
    policy = registry.get("eviction", settings.eviction, "eviction")(num_slots=8, options=settings.eviction_options)

    for tick, (slot, priority) in enumerate([(5, 90), (2, 0), (7, 35), (1, 100)]):
        policy.add(slot, priority, tick)
    policy.add(5, 0, 10)  # already queued: keeps its place
    assert len(policy) == 4
    policy.discard(2)
    policy.discard(3)  # unknown slots are ignored
    assert [policy.victim() for _ in range(4)] == [5, 7, 1, None]
    assert len(policy) == 0

    lru = registry.get("eviction", "lru", "eviction")(num_slots=8)
    for tick, (slot, priority) in enumerate([(5, 90), (7, 35), (1, 100)]):
        lru.add(slot, priority, tick)
    assert lru.victim() == 7, "core's lru orders by priority first; fifo does not"
