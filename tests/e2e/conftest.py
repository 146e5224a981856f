"""End-to-end fixtures: kvbm's connector on the reference executor, against the no-connector baseline.

``kvbm_run`` builds a profile in a temporary directory, points ``DYN_KVBM_*`` at it exactly as a
user would, runs the workload once without and once with kvbm (same model weights), and returns
both results plus the leader's stats. Every run uses the KV oracle: each device-reused or onboarded
prefix is compared, layer by layer, with recomputation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kvbm_core.testing import ExecutorConfig, ReferenceExecutor, RequestSpec, RunResult
from kvbm_core.trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker

CONNECTOR = (KvbmConnectorLeader, KvbmConnectorWorker)
TOKENS_PER_BLOCK = 16
#: ``KVBM_TEST_DEVICE=cuda`` runs the same end-to-end tests on a GPU (pool, model, streams, pinned
#: host tier); the model then runs in its exact mode so KV bytes stay comparable bit for bit.
DEVICE = os.environ.get("KVBM_TEST_DEVICE", "cpu")




def executor_config(**overrides: Any) -> ExecutorConfig:
    """A device pool small enough that multi-turn work overflows it (device eviction happens)."""
    base = ExecutorConfig(
        model="tiny",
        tokens_per_block=TOKENS_PER_BLOCK,
        num_blocks=24,
        max_batch_size=4,
        max_num_tokens=512,
        max_seq_len=512,
        oracle=True,
        device=DEVICE,
        model_mode="exact",
    )
    return replace(base, **overrides)


def conversations(users: int = 4, turns: int = 3, system: int = 48, history: int = 40, answer: int = 24,
                  question: int = 8, max_new_tokens: int = 6, seed: int = 0, steps_between_turns: int = 12
                  ) -> list[RequestSpec]:
    """Multi-turn chats sharing a system prompt: turn k extends turn k-1 by an answer and a question.

    Turns of one user arrive ``steps_between_turns`` iterations apart, users staggered, so other
    users' work evicts a conversation's device blocks between its turns.
    """
    rng = np.random.default_rng(seed)
    shared = rng.integers(1, 250, system).tolist()
    specs: list[RequestSpec] = []
    for user in range(users):
        prompt = shared + rng.integers(1, 250, history).tolist()
        for turn in range(turns):
            prompt = prompt + rng.integers(1, 250, question).tolist()
            specs.append(RequestSpec(prompt, max_new_tokens, arrival_step=turn * steps_between_turns + user))
            prompt = prompt + rng.integers(1, 250, answer).tolist()
    return specs


@dataclass
class Comparison:
    baseline: RunResult
    kvbm: RunResult
    stats: Any
    executor: ReferenceExecutor

    def assert_same_tokens(self) -> None:
        assert self.kvbm.tokens() == self.baseline.tokens()


def write_profile(path: Path, tiers: Sequence[dict], **extra: Any) -> Path:
    data = {"tiers": list(tiers), "cost_model": {"enabled": False}, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def settle(executor: ReferenceExecutor) -> None:
    """Let every rank finish the copies still in flight when the run returned (the engine does not
    wait for them), so that the leader's accounting is complete."""
    for worker in executor.workers:
        assert worker.wait_until_idle(timeout=60.0)


def close_connector(executor: ReferenceExecutor) -> None:
    for worker in executor.workers:
        worker.close()
    executor.scheduler.close()


@pytest.fixture
def kvbm_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Comparison]:
    """``kvbm_run(specs, tiers=[...], config=ExecutorConfig, env={...}, connector=(leader, worker))``
    -> :class:`Comparison`."""
    opened: list[ReferenceExecutor] = []

    def run(specs: list[RequestSpec], tiers: Sequence[dict], config: ExecutorConfig | None = None,
            env: dict[str, str] | None = None, baseline: RunResult | None = None, model: Any = None,
            connector: tuple[type, type] = CONNECTOR) -> Comparison:
        config = config or executor_config()
        profile = write_profile(tmp_path / "profile.yaml", tiers)
        monkeypatch.setenv("DYN_KVBM_PROFILE", str(profile))
        monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(tmp_path))
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        if baseline is None:
            reference = ReferenceExecutor(config, model=model)
            baseline = reference.run(specs)
            model = reference.model
        executor = ReferenceExecutor(config, connector=connector, model=model)
        opened.append(executor)
        result = executor.run(specs)
        settle(executor)
        return Comparison(baseline, result, executor.scheduler.stats, executor)

    yield run
    for executor in opened:
        close_connector(executor)
