"""Drives a :class:`~kvbm_core.bench.workload.MultiRoundQA` through one reference-executor run.

Round 0 of every user is submitted up front (arriving at the user's join time); each later round is
created when the user's previous request finishes (the executor's ``on_finish``), because its
prompt holds the answer just generated. :attr:`SessionDriver.turns` maps the executor's request
index to ``(user, round)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvbm_core.bench.workload import MultiRoundQA
from kvbm_core.testing import RequestResult, RequestSpec


@dataclass(frozen=True)
class Turn:
    """Which request of the workload an executor index is."""

    user: int
    round: int


class SessionDriver:
    """One run's sessions. Build a new driver for every run: it holds the prompts in flight."""

    def __init__(self, workload: MultiRoundQA, on_request_done: Callable[[], None] | None = None):
        self.workload = workload
        self.turns: list[Turn] = []
        self._prompts: dict[int, np.ndarray] = {}
        self._done = on_request_done

    def initial_specs(self) -> list[RequestSpec]:
        cfg = self.workload.config
        specs = []
        for user in range(cfg.users):
            specs.append(self._spec(Turn(user, 0), self.workload.first_prompt(user), cfg.join_s(user)))
        return specs

    def on_finish(self, index: int, result: RequestResult) -> list[RequestSpec]:
        """The executor's ``on_finish``: the user's next round, if the session has one."""
        if self._done is not None:
            self._done()
        turn = self.turns[index]
        prompt = self._prompts.pop(index)
        cfg = self.workload.config
        if turn.round + 1 >= cfg.rounds or result.cancelled:
            return []
        nxt = Turn(turn.user, turn.round + 1)
        answer = np.asarray(result.tokens, dtype=np.int64)
        prompt = self.workload.next_prompt(nxt.user, nxt.round, prompt, answer)
        return [self._spec(nxt, prompt, cfg.next_send_s(result.arrival_s, result.finish_s))]

    def _spec(self, turn: Turn, prompt: np.ndarray, send_s: float) -> RequestSpec:
        self._prompts[len(self.turns)] = prompt
        self.turns.append(turn)
        return RequestSpec(prompt=prompt.tolist(), max_new_tokens=self.workload.config.answer_tokens,
                           arrival_time_s=send_s)
