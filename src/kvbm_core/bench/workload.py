"""The multi-round QA workload of ``kvbm bench``: its token ids and its arrival schedule. Pure: no engine.

Modelled on LMBenchmark's synthetic multi-round QA. ``users`` users each hold a session of
``rounds`` requests. Round 0's prompt is a shared system prompt, then the user's own history, then a
question; round ``r + 1``'s prompt is round ``r``'s prompt, then the answer generated for it, then a
new question. Every request therefore extends the previous request of its user. Lengths are exact
token counts: ``system_tokens``, ``history_tokens``, ``question_tokens``; answers are
``answer_tokens`` long. Token ids are uniform random in ``[0, vocab_size)``, drawn from a generator
seeded by ``(seed, namespace, part, user, round)``. Users do not share a prefix beyond the system
prompt, and the ids do not depend on the order in which they are asked for.

Schedule (wall time from the start of the run): user ``u`` sends round 0 at
``u * ramp_up_s / users``. Each later round goes out ``users / qps`` seconds (the per-user gap)
after the user's previous request was sent, or as soon as that request finished, whichever is later.
So about ``qps`` requests a second are offered once every user has joined. ``qps = inf`` offers
everything at once: every user at time 0, each round right after the previous one finished.
``ramp_up_s`` defaults to one per-user gap.

The run is bounded by rounds, not by time: exactly ``users * rounds`` requests. No user replaces a
finished one (LMBenchmark replaces users while its ``--time`` lasts), so a run with kvbm and one
without serve exactly the same requests, and their outputs compare by ``(user, round)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvbm_core.errors import ConfigError

_SYSTEM, _HISTORY, _QUESTION = 0, 1, 2


@dataclass(frozen=True)
class WorkloadConfig:
    """The workload's knobs; each error names the ``kvbm bench`` flag that sets the value."""

    users: int
    rounds: int
    system_tokens: int
    history_tokens: int
    question_tokens: int
    answer_tokens: int
    qps: float
    seed: int
    vocab_size: int
    ramp_up_s: float | None = None  # None: one per-user gap

    def __post_init__(self) -> None:
        for flag, value, least in (
            ("--users", self.users, 1),
            ("--rounds", self.rounds, 1),
            ("--system-tokens", self.system_tokens, 0),
            ("--history-tokens", self.history_tokens, 0),
            ("--question-tokens", self.question_tokens, 1),
            ("--answer-tokens", self.answer_tokens, 1),
            ("vocab_size", self.vocab_size, 2),
        ):
            if value < least:
                raise ConfigError(flag, f"must be >= {least}, got {value}")
        if not self.qps > 0:
            raise ConfigError("--qps", f"must be > 0 (inf: no pacing), got {self.qps}")
        if self.ramp_up_s is not None and not (self.ramp_up_s >= 0 and math.isfinite(self.ramp_up_s)):
            raise ConfigError("--ramp-up-s", f"must be a finite number >= 0, got {self.ramp_up_s}")

    @property
    def gap_s(self) -> float:
        """Seconds between the sends of one user's consecutive requests (at the least)."""
        return 0.0 if math.isinf(self.qps) else self.users / self.qps

    @property
    def ramp_s(self) -> float:
        return self.gap_s if self.ramp_up_s is None else self.ramp_up_s

    def join_s(self, user: int) -> float:
        """When ``user`` sends round 0."""
        return user * self.ramp_s / self.users

    def next_send_s(self, sent_s: float, finished_s: float) -> float:
        """When a user sends its next request, given when the previous one was sent and finished."""
        return max(sent_s + self.gap_s, finished_s)

    def prompt_tokens(self, round_: int) -> int:
        """Prompt length of round ``round_`` (the same for every user)."""
        return self.system_tokens + self.history_tokens + round_ * (self.answer_tokens + self.question_tokens) + (
            self.question_tokens
        )

    @property
    def max_prompt_tokens(self) -> int:
        return self.prompt_tokens(self.rounds - 1)

    @property
    def max_sequence_tokens(self) -> int:
        """The longest prompt plus its answer: the sequence length the engine must hold."""
        return self.max_prompt_tokens + self.answer_tokens

    @property
    def num_requests(self) -> int:
        return self.users * self.rounds


class MultiRoundQA:
    """The token ids of one workload. ``namespace`` separates streams of one seed (the warm-up uses 1)."""

    def __init__(self, config: WorkloadConfig, namespace: int = 0):
        self.config = config
        self.namespace = namespace
        self._system = self._draw(_SYSTEM, 0, 0, config.system_tokens)

    def _draw(self, part: int, user: int, round_: int, n: int) -> np.ndarray:
        seq = np.random.SeedSequence([self.config.seed, self.namespace, part, user, round_])
        return np.random.default_rng(seq).integers(0, self.config.vocab_size, n, dtype=np.int64)

    def system_prompt(self) -> np.ndarray:
        return self._system

    def history(self, user: int) -> np.ndarray:
        return self._draw(_HISTORY, user, 0, self.config.history_tokens)

    def question(self, user: int, round_: int) -> np.ndarray:
        return self._draw(_QUESTION, user, round_, self.config.question_tokens)

    def first_prompt(self, user: int) -> np.ndarray:
        return np.concatenate([self._system, self.history(user), self.question(user, 0)])

    def next_prompt(self, user: int, round_: int, previous_prompt: np.ndarray, answer: np.ndarray) -> np.ndarray:
        """Round ``round_``'s prompt: the previous round's prompt, its answer, a new question."""
        if len(answer) != self.config.answer_tokens:
            raise ValueError(f"user {user} round {round_ - 1}: answer has {len(answer)} tokens, "
                             f"expected {self.config.answer_tokens}")
        return np.concatenate([previous_prompt, np.asarray(answer, dtype=np.int64), self.question(user, round_)])
