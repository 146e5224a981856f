"""Fixtures of the leader tests: the plugin registry and a BlockManager builder."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvbm_core.leader import BlockManager
from kvbm_core.registry import Registry
from kvbm_core.settings.model import KvbmSettings

from .leader_setup import Stager, layout, settings


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry()


@pytest.fixture
def make_bm(registry: Registry) -> Callable[..., BlockManager]:
    def make(s: KvbmSettings | None = None, *, tokens_per_block: int = 4, world_size: int = 1,
             clock: Callable[[], float] | None = None, model_id: str = "test-model",
             stager: Stager | None = None, host_grows: bool = False) -> BlockManager:
        kw = {"clock": clock} if clock is not None else {}
        return BlockManager(s or settings(), layout(tokens_per_block), world_size=world_size, model_id=model_id,
                            registry=registry, stager=stager or Stager(world_size), host_grows=host_grows, **kw)

    return make
