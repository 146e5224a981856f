"""What one :meth:`ReferenceExecutor.run` returns: per-request outputs and timings, steps, counters."""

from __future__ import annotations

from dataclasses import dataclass

from kvbm_core.testing.connector_manager import CallCounts


@dataclass(frozen=True)
class RequestResult:
    """One request, in the order the specs were given. Times are seconds since the run started."""

    request_id: int
    prompt_len: int
    tokens: tuple[int, ...]  # generated tokens (fewer than max_new_tokens if cancelled)
    cancelled: bool
    arrival_s: float
    first_token_s: float | None  # when the first generated token reached the client
    finish_s: float
    device_reused_tokens: int  # prompt tokens matched in the device pool
    connector_tokens: int  # prompt tokens the connector promised to load
    async_load: bool
    error: str | None = None  # set when the request failed (its promised KV could not be loaded)

    @property
    def ttft_s(self) -> float | None:
        """Time to first token: from arrival to the first generated token."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s


@dataclass(frozen=True)
class StepRecord:
    """One executor iteration that scheduled work or made progress."""

    iteration: int
    start_s: float
    duration_s: float
    forward_s: float  # model forward through wait_for_save and reading the sampled tokens; 0 without one
    context_tokens: int
    generation_tokens: int
    layer_hooks: bool  # whether per-layer connector hooks ran (off on CUDA-graph-like decode steps)


@dataclass(frozen=True)
class RunCounters:
    iterations: int  # loop iterations, idle ones included (get_finished runs in each)
    scheduled_iterations: int  # iterations with a non-empty batch (build_connector_meta ran)
    forwards: int
    forwards_with_layer_hooks: int
    computed_prompt_tokens: int  # prompt tokens the model computed (not reused, not loaded)
    device_reused_tokens: int
    connector_tokens: int
    device_reused_blocks: int
    stored_blocks: int
    evicted_blocks: int
    allocated_blocks: int
    async_loads: int
    async_saves: int
    oracle_checked_tokens: int  # reused/onboarded prompt tokens compared with recomputation
    forward_errors: int  # forward passes a connector error ended (every active request failed)


@dataclass(frozen=True)
class RunResult:
    requests: tuple[RequestResult, ...]
    steps: tuple[StepRecord, ...]
    counters: RunCounters
    calls: CallCounts | None  # connector calls since the executor was built; None without a connector
    wall_s: float
    pending_saves: tuple[int, ...] = ()  # requests whose async save no get_finished has released yet
    pinned_blocks: int = 0  # device blocks still pinned for async saves when the run returned

    def tokens(self) -> list[tuple[int, ...]]:
        return [r.tokens for r in self.requests]
