"""The reference executor's bookkeeping during one run: per-request tracks, forward results, tallies.

Internal to :mod:`kvbm_core.testing.executor`; connectors never see these objects (they see
:class:`~kvbm_core.testing.request.LlmRequest`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kvbm_core.testing.kv_manager import ManagerStats
from kvbm_core.testing.oracle import PrefixTruth
from kvbm_core.testing.request import LlmRequest, RequestSpec
from kvbm_core.testing.results import RequestResult, RunCounters, StepRecord


class RequestTrack:
    """One request's progress, as only the executor knows it."""

    def __init__(self, index: int, spec: RequestSpec, request: LlmRequest, blocks_total: int):
        self.index = index
        self.spec = spec
        self.request = request
        self.blocks_total = blocks_total  # blocks it may ever hold: prompt + max_new_tokens
        self.arrival_s = 0.0
        self.first_token_s: float | None = None
        self.finish_s = 0.0
        self.allocated = False
        self.done = False
        self.cancelled = False
        self.generated: list[int] = []
        self.pending: int | None = None  # overlap scheduler: sampled, not appended yet
        self.kv_len = 0  # leading positions whose KV in the pool is valid
        self.reused = 0  # prompt tokens matched in the device pool
        self.external = 0  # prompt tokens the connector promised
        self.async_load = False
        self.error: str | None = None  # why the request failed (a promised load that did not verify)
        self.truth: PrefixTruth | None = None  # the oracle's recomputation of the reused prefix

    @property
    def rid(self) -> int:
        return self.request.request_id

    def token_at(self, position: int) -> int:
        """The token at ``position`` of the sequence, counting a sampled token not yet appended."""
        prompt = self.spec.prompt
        if position < len(prompt):
            return prompt[position]
        i = position - len(prompt)
        if i < len(self.generated):
            return self.generated[i]
        if i == len(self.generated) and self.pending is not None:
            return self.pending
        raise RuntimeError(f"request {self.rid}: no token at position {position}")

    def result(self) -> RequestResult:
        return RequestResult(
            request_id=self.rid,
            prompt_len=len(self.spec.prompt),
            tokens=tuple(self.generated),
            cancelled=self.cancelled,
            arrival_s=self.arrival_s,
            first_token_s=self.first_token_s,
            finish_s=self.finish_s,
            device_reused_tokens=self.reused,
            connector_tokens=self.external,
            async_load=self.async_load,
            error=self.error,
        )


@dataclass
class ScheduledItem:
    track: RequestTrack
    context: bool  # a prompt chunk; otherwise one decode step


@dataclass
class ForwardResult:
    """A forward pass whose results are handled now (or, with the overlap scheduler, next iteration)."""

    forward_s: float
    layer_hooks: bool
    samples: list[tuple[RequestTrack, int]] = field(default_factory=list)
    prefill_done: list[RequestTrack] = field(default_factory=list)
    context_tokens: int = 0
    generation_tokens: int = 0


@dataclass
class RunTally:
    iterations: int = 0
    scheduled_iterations: int = 0
    forwards: int = 0
    forwards_with_layer_hooks: int = 0
    computed_prompt_tokens: int = 0
    device_reused_tokens: int = 0
    connector_tokens: int = 0
    async_loads: int = 0
    async_saves: int = 0
    oracle_checked_tokens: int = 0
    forward_errors: int = 0  # forward passes a connector error ended (_handle_errors)
    allocations: int = 0  # requests that got KV blocks
    finished_allocated: int = 0  # of those, requests that ended (request_finished)

    def counters(self, before: ManagerStats, after: ManagerStats) -> RunCounters:
        return RunCounters(
            iterations=self.iterations,
            scheduled_iterations=self.scheduled_iterations,
            forwards=self.forwards,
            forwards_with_layer_hooks=self.forwards_with_layer_hooks,
            computed_prompt_tokens=self.computed_prompt_tokens,
            device_reused_tokens=self.device_reused_tokens,
            connector_tokens=self.connector_tokens,
            device_reused_blocks=after.reused_blocks - before.reused_blocks,
            stored_blocks=after.stored_blocks - before.stored_blocks,
            evicted_blocks=after.evicted_blocks - before.evicted_blocks,
            allocated_blocks=after.allocated_blocks - before.allocated_blocks,
            async_loads=self.async_loads,
            async_saves=self.async_saves,
            oracle_checked_tokens=self.oracle_checked_tokens,
            forward_errors=self.forward_errors,
        )

    def expected_calls(self, num_layers: int, block_reuse: bool) -> tuple[dict[str, int], dict[str, int]]:
        """How often TRT-LLM calls each method in such a run: (scheduler, each rank's worker)."""
        scheduler = {
            "get_num_new_matched_tokens": self.allocations if block_reuse else 0,  # only asked with reuse on
            "update_state_after_alloc": self.allocations,
            "build_connector_meta": self.scheduled_iterations,
            "request_finished": self.finished_allocated,
        }
        worker = {
            "register_kv_caches": 0,  # once, when the executor was built
            "bind_connector_meta": self.scheduled_iterations,
            "start_load_kv": self.scheduled_iterations,
            "get_finished": self.iterations,
        }
        if not self.forward_errors:  # a failed forward pass stops at the call that raised
            worker["wait_for_layer_load"] = worker["save_kv_layer"] = num_layers * self.forwards_with_layer_hooks
            worker["wait_for_save"] = self.forwards
        return scheduler, worker


@dataclass
class RunState:
    tracks: list[RequestTrack]
    t0: float
    arrivals: deque[RequestTrack]  # not yet submitted, in arrival order
    waiting: deque[RequestTrack] = field(default_factory=deque)  # submitted, no KV blocks yet
    active: list[RequestTrack] = field(default_factory=list)  # holding KV blocks (parked ones too)
    by_id: dict[int, RequestTrack] = field(default_factory=dict)
    previous: ForwardResult | None = None
    iteration: int = 0
    steps: list[StepRecord] = field(default_factory=list)
    tally: RunTally = field(default_factory=RunTally)
    last_progress: float = 0.0
    on_finish: Callable[[int, RequestResult], Iterable[RequestSpec]] | None = None  # dynamic arrivals

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def busy(self) -> bool:
        """Whether TRT-LLM's loop would keep iterating rather than block on its request queue.

        Requests that only save asynchronously do not count: TRT-LLM waits for new requests then.
        """
        return bool(self.waiting or self.active)
