"""What the end-to-end and cluster tests share: the reference executor's configuration, multi-turn
chat workloads, profiles, and closing a connector. (A module of its own, not a conftest: test modules
import it by a name no other directory uses.)"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
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
                  question: int = 8, max_new_tokens: int = 6, seed: int = 0, steps_between_turns: int = 12,
                  salt: str | None = None) -> list[RequestSpec]:
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
            specs.append(RequestSpec(prompt, max_new_tokens, arrival_step=turn * steps_between_turns + user,
                                     cache_salt=salt))
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
