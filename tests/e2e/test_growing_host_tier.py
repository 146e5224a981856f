"""A host tier that is still growing while the engine serves, on the reference executor.

The tier is the ``cpu`` tier with one-slot segments, held at its first segment until the engine has
run ``GROW_AT`` iterations (a subclass built with ``paused=True``, registered as an in-process
plugin), then grown to all of its slots. Tokens and every onboarded block's KV must equal the run
without kvbm, and no operation fails: every rank reports how much of its tier is usable and the
leader plans only into slots that every rank can use.
"""

from __future__ import annotations

from typing import Any

import pytest

from engine_runs import conversations, executor_config

import kvbm_core.registry
from kvbm_core.hookspecs import hookimpl
from kvbm_core.interfaces import TierContext, TierLevel
from kvbm_core.registry import Registry, blocked_from_environment
from kvbm_core.trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker
from kvbm_tier_cpu import PinnedHostTier

NUM_SLOTS = 8
GROW_AT = 12
TIERS = [{"kind": "gated_cpu", "num_blocks": NUM_SLOTS, "options": {"segment_mb": 1e-6}}]  # one slot a segment


class GatedHostTier(PinnedHostTier):
    """The cpu tier, grown only when the engine's worker says so."""

    name = "gated_cpu"

    def __init__(self, context: TierContext) -> None:
        super().__init__(context, paused=True)


class GatedPlugin:
    """Contributes the gated tier and records every failed operation."""

    def __init__(self) -> None:
        self.failures: list[tuple[str, str]] = []

    @hookimpl
    def kvbm_tier_types(self) -> list[type]:
        return [GatedHostTier]

    @hookimpl
    def kvbm_transfer_failed(self, route: str, op_id: int, request_id: int, error: str) -> None:
        self.failures.append((route, error))


class GrowingWorker(KvbmConnectorWorker):
    """Serves ``GROW_AT`` iterations on the tier's first segment, then lets it grow (and waits)."""

    ready_seen: list[int] = []

    def get_finished(self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]) -> Any:
        host = self._tiers.get(TierLevel.HOST)
        if host is not None:
            if len(self.ready_seen) == GROW_AT:
                host.resume_growth()
                assert host.wait_ready(NUM_SLOTS, timeout=60) == NUM_SLOTS
            type(self).ready_seen.append(host.ready_slots)
        return super().get_finished(finished_gen_req_ids, started_loading_req_ids)


@pytest.fixture
def gated_plugin(monkeypatch: pytest.MonkeyPatch) -> GatedPlugin:
    plugin = GatedPlugin()
    registry = Registry(blocked_from_environment())
    registry.register(plugin, "gated_tier")
    monkeypatch.setattr(kvbm_core.registry, "_default", registry)
    GrowingWorker.ready_seen = []
    return plugin


def test_engine_serves_correctly_while_the_host_tier_grows(kvbm_run, gated_plugin):
    specs = conversations(users=2, turns=4, system=16, history=16, answer=16, question=8)
    config = executor_config(num_blocks=8)  # the device pool holds less than both users: the host tier serves
    result = kvbm_run(specs, TIERS, config=config, connector=(KvbmConnectorLeader, GrowingWorker))
    result.assert_same_tokens()
    assert result.kvbm.counters.oracle_checked_tokens > 0
    seen = GrowingWorker.ready_seen
    assert seen[:GROW_AT] == [1] * GROW_AT and set(seen[GROW_AT:]) == {NUM_SLOTS}, seen
    assert result.stats.offload_blocks_d2h > 0 and result.stats.onboard_blocks_h2d > 0
    assert not gated_plugin.failures, gated_plugin.failures
