"""Plugins that misbehave while the engine serves: each is stopped, named, and the engine keeps serving.

Every misbehaving class is a real plugin, registered in-process through the registry the connector
uses, and selected by name in a profile. Each test serves multi-turn chats on the reference executor
(kvbm's connector, tiny model, CPU) and checks: the outputs equal the run without kvbm, exactly one
error line names the plugin's distribution, and what the engine then does:

- an eviction policy that misbehaves at its first call is replaced by core's ``lru`` holding the
  same slots in the same order, so the leader's accounting equals a run that used ``lru`` from the
  start;
- a disk admission filter that misbehaves at its first call is switched off and the route admits
  nothing, so no block reaches the disk (a well-behaved filter that admits everything moves many).
"""

from __future__ import annotations

import io
import json
import logging
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import kvbm_core.registry
from kvbm_core import hookimpl
from kvbm_core.interfaces import EvictionPolicy, OffloadFilter
from kvbm_core.logging import configure
from kvbm_core.lru import PriorityLruEviction
from kvbm_core.ops import Route
from kvbm_core.registry import Registry
from kvbm_core.settings.model import LoggingSettings
from kvbm_core.testing import ExecutorConfig, ReferenceExecutor, RequestSpec
from kvbm_core.trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker

DISTRIBUTION = "kvbm-misbehaving"
CONFIG = ExecutorConfig(model="tiny", tokens_per_block=16, num_blocks=24, max_batch_size=4, max_num_tokens=512,
                        max_seq_len=512, model_mode="exact")
HOST_ONLY = [{"kind": "cpu", "num_blocks": 12}]
HOST_AND_DISK = [{"kind": "cpu", "num_blocks": 12}, {"kind": "disk", "num_blocks": 128}]


# ---------------------------------------------------------------------------- the plugins
class Wrapped(EvictionPolicy):
    """Core's lru behind the policy interface; each subclass breaks one call."""

    name = "wrapped_lru"

    def __init__(self, num_slots: int, options: Any = None) -> None:
        super().__init__(num_slots, options)
        self.lru = PriorityLruEviction(num_slots)

    def add(self, slot: int, priority: int, tick: int) -> None:
        self.lru.add(slot, priority, tick)

    def discard(self, slot: int) -> None:
        self.lru.discard(slot)

    def victim(self) -> int | None:
        return self.lru.victim()

    def __len__(self) -> int:
        return len(self.lru)


class RaisingVictim(Wrapped):
    name = "raising_victim"

    def victim(self):
        raise RuntimeError("victim bug")


class GarbageVictim(Wrapped):
    name = "garbage_victim"

    def victim(self):
        return "slot 3"


class OutOfRangeVictim(Wrapped):
    name = "out_of_range_victim"

    def victim(self):
        return self.num_slots


class NoneWhileEvictable(Wrapped):
    name = "none_while_evictable"

    def victim(self):
        return None


class StuckVictim(Wrapped):
    """Keeps naming its first victim: before the guard, the scheduler spun on it forever."""

    name = "stuck_victim"
    first: int | None = None

    def victim(self):
        if self.first is None:
            self.first = self.lru.victim()
        return self.first


class RaisingAdd(Wrapped):
    name = "raising_add"

    def add(self, slot, priority, tick):
        raise KeyError(slot)


class RaisingDiscard(Wrapped):
    name = "raising_discard"

    def discard(self, slot):
        raise ValueError(f"no slot {slot}")


class LyingLen(Wrapped):
    """Claims to hold nothing: harmless, as the tier keeps its own counts."""

    name = "lying_len"

    def __len__(self):
        return 0


class AdmitAll(OffloadFilter):
    name = "admit_all"

    def admit(self, keys):
        return np.ones(len(keys), bool)


class RaisingFilter(OffloadFilter):
    name = "raising_filter"

    def admit(self, keys):
        raise RuntimeError("filter bug")


class ShortAnswer(OffloadFilter):
    name = "short_answer"

    def admit(self, keys):
        return np.ones(len(keys) + 1, bool)


class FloatAnswer(OffloadFilter):
    name = "float_answer"

    def admit(self, keys):
        return np.ones(len(keys))


class ListAnswer(OffloadFilter):
    name = "list_answer"

    def admit(self, keys):
        return [True] * len(keys)


POLICIES = [RaisingVictim, GarbageVictim, OutOfRangeVictim, NoneWhileEvictable, StuckVictim, RaisingAdd, RaisingDiscard]
FILTERS = [RaisingFilter, ShortAnswer, FloatAnswer, ListAnswer]


def plugin() -> types.ModuleType:
    module = types.ModuleType("kvbm_misbehaving")

    @hookimpl
    def kvbm_eviction_policies():
        return [Wrapped, LyingLen, *POLICIES]

    @hookimpl
    def kvbm_offload_filters():
        return [AdmitAll, *FILTERS]

    module.kvbm_eviction_policies = kvbm_eviction_policies
    module.kvbm_offload_filters = kvbm_offload_filters
    return module


# ------------------------------------------------------------------------------ serving
def conversations(users: int = 4, turns: int = 3, seed: int = 0) -> list[RequestSpec]:
    """Chats sharing a system prompt; each turn extends the previous one, users interleaved."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(1, 250, 48).tolist()
    specs = []
    for user in range(users):
        prompt = shared + rng.integers(1, 250, 40).tolist()
        for turn in range(turns):
            prompt = prompt + rng.integers(1, 250, 8).tolist()
            specs.append(RequestSpec(prompt, 6, arrival_step=turn * 12 + user))
            prompt = prompt + rng.integers(1, 250, 24).tolist()
    return specs


@pytest.fixture(scope="module")
def baseline() -> tuple[Any, list[tuple[int, ...]]]:
    """The reference model and the tokens it generates without kvbm."""
    reference = ReferenceExecutor(CONFIG)
    return reference.model, reference.run(conversations()).tokens()


@pytest.fixture(scope="module")
def registry() -> Registry:
    registry = Registry()
    registry.register(plugin(), "misbehaving", DISTRIBUTION, "1")
    return registry


class Served:
    """One run with kvbm: its tokens, the leader, and the kvbm log records (JSON) it wrote."""

    def __init__(self, tokens: list[tuple[int, ...]], executor: ReferenceExecutor, log: str) -> None:
        self.tokens = tokens
        self.stats = executor.scheduler.stats
        self.records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]

    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["level"] == "error"]


@pytest.fixture
def serve(baseline, registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Served]]:
    """``serve(tiers, **profile)`` serves the chats with kvbm on the given profile."""
    monkeypatch.setattr(kvbm_core.registry, "_default", registry)
    model, _ = baseline
    opened: list[ReferenceExecutor] = []

    def run(tiers: list[dict[str, Any]], **profile: Any) -> Served:
        path = tmp_path / f"profile{len(opened)}.yaml"
        path.write_text(yaml.safe_dump({"tiers": tiers, "cost_model": {"enabled": False}, **profile}))
        monkeypatch.setenv("DYN_KVBM_PROFILE", str(path))
        monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(tmp_path))
        executor = ReferenceExecutor(CONFIG, connector=(KvbmConnectorLeader, KvbmConnectorWorker), model=model)
        opened.append(executor)
        buffer = io.StringIO()
        configure(LoggingSettings(format="json", level="info"), stream=buffer, scope="kvbm")
        tokens = executor.run(conversations()).tokens()
        return Served(tokens, executor, buffer.getvalue())

    yield run
    for executor in opened:
        for worker in executor.workers:
            worker.close()
        executor.scheduler.close()
    kvbm = logging.getLogger("kvbm")
    for handler in [h for h in kvbm.handlers if h.get_name() == "kvbm"]:
        kvbm.removeHandler(handler)


@pytest.fixture
def with_lru(serve) -> Served:
    """The same chats with a well-behaved policy (core's lru, wrapped like the misbehaving ones)."""
    return serve(HOST_ONLY, eviction="wrapped_lru")


# -------------------------------------------------------------------------------- tests
def test_the_workload_evicts_and_reuses_from_the_host_tier(baseline, with_lru):
    assert with_lru.tokens == baseline[1]
    assert with_lru.stats.offload_blocks_d2h > 12, "more blocks were stored than the host tier holds"
    assert with_lru.stats.onboard_blocks_h2d > 0
    assert not with_lru.errors()


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_misbehaving_eviction_policy_is_replaced_by_lru(serve, baseline, with_lru, policy):
    served = serve(HOST_ONLY, eviction=policy.name)
    assert served.tokens == baseline[1]
    (error,) = served.errors()
    assert error["distribution"] == DISTRIBUTION and error["policy"] == policy.name and error["tier"] == "cpu"
    assert "the built-in policy takes over" in error["event"]
    assert served.stats.blocks == with_lru.stats.blocks, "lru took over the same slots in the same order"
    assert served.stats.host_hit_rate == with_lru.stats.host_hit_rate


def test_a_policy_whose_len_lies_misleads_nothing(serve, baseline, with_lru):
    served = serve(HOST_ONLY, eviction=LyingLen.name)
    assert served.tokens == baseline[1]
    assert not served.errors()
    assert served.stats.blocks == with_lru.stats.blocks


def test_a_filter_that_admits_everything_moves_blocks_to_disk(serve, baseline):
    served = serve(HOST_AND_DISK, disk_offload_filter={"name": AdmitAll.name})
    assert served.tokens == baseline[1]
    assert served.stats.offload_blocks_h2disk > 0 and not served.errors()


@pytest.mark.parametrize("admission", FILTERS, ids=lambda f: f.name)
def test_misbehaving_disk_filter_is_switched_off_and_admits_nothing(serve, baseline, admission):
    served = serve(HOST_AND_DISK, disk_offload_filter={"name": admission.name})
    assert served.tokens == baseline[1]
    (error,) = served.errors()
    assert error["distribution"] == DISTRIBUTION and error["filter"] == admission.name
    assert "admits nothing" in error["event"]
    assert served.stats.offload_blocks_h2disk == 0
    assert served.stats.blocks[Route.D2H] > 0, "host offload goes on"
