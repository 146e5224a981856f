"""Builders shared by the leader tests: settings for each pipeline shape and a BlockManager."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvbm_core.layout import BlockLayout
from kvbm_core.leader import BlockManager
from kvbm_core.registry import Registry
from kvbm_core.settings.model import KvbmSettings


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry()


def layout(tokens_per_block: int = 4) -> BlockLayout:
    return BlockLayout(num_layers=2, kv_factor=2, elems_per_block=8 * tokens_per_block, dtype="float16",
                       tokens_per_block=tokens_per_block)


def settings(host: int | None = 16, disk: int | None = None, *, disk_filter: bool = True, cost: bool = False,
             min_priority: int = 0, **extra) -> KvbmSettings:
    tiers = []
    if host is not None:
        tiers.append({"kind": "cpu", "num_blocks": host})
    if disk is not None:
        tiers.append({"kind": "disk", "num_blocks": disk})
    data = {
        "tiers": tiers,
        "disk_offload_filter": {"enabled": disk_filter},
        "cost_model": {"enabled": cost},
        "host_offload_prefix_min_priority": min_priority,
        **extra,
    }
    return KvbmSettings.model_validate(data)


@pytest.fixture
def make_bm(registry: Registry) -> Callable[..., BlockManager]:
    def make(s: KvbmSettings | None = None, *, tokens_per_block: int = 4, world_size: int = 1,
             clock: Callable[[], float] | None = None, model_id: str = "test-model") -> BlockManager:
        kw = {"clock": clock} if clock is not None else {}
        return BlockManager(s or settings(), layout(tokens_per_block), world_size=world_size, model_id=model_id,
                            registry=registry, **kw)

    return make
