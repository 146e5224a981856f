"""A connector that breaks TRT-LLM's contract: strict mode names the method at fault; the faithful
default fails where TRT-LLM itself would."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from kvbm_core.testing import ContractViolation, ExecutorConfig, ReferenceExecutor, RequestSpec

from .recording_connector import Options, make_connector

CFG = ExecutorConfig(tokens_per_block=16, num_blocks=32, max_seq_len=128, strict=True)
FAITHFUL = ExecutorConfig(tokens_per_block=16, num_blocks=32, max_seq_len=128)
SPEC = RequestSpec(list(range(40)), 3)


def _run(
    options: Options, scheduler_base: type | None = None, worker_base: type | None = None, cfg: ExecutorConfig = CFG
) -> None:
    scheduler, worker, _ = make_connector(options)
    if scheduler_base is not None:
        scheduler = type("Scheduler", (scheduler_base, scheduler), {})
    if worker_base is not None:
        worker = type("Worker", (worker_base, worker), {})
    ReferenceExecutor(cfg, connector=(scheduler, worker)).run([SPEC])


def test_async_load_of_nothing_is_a_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="load_kv_async must be False when num_tokens is 0!"):
        _run(Options(match=lambda request, n: (0, True)), cfg=FAITHFUL)


def test_promising_the_whole_prompt_is_rejected() -> None:
    with pytest.raises(ContractViolation, match="There must be at least one uncomputed token in the prompt!"):
        _run(Options(match=lambda request, n: (request.prompt_len, False)))


@pytest.mark.parametrize("answer", [5, (1.5, False), (16, "yes"), (-16, False)])
def test_malformed_match_answers_are_rejected(answer: Any) -> None:
    with pytest.raises(ContractViolation, match="get_num_new_matched_tokens"):
        _run(Options(match=lambda request, n: answer))


class _UnknownIds:
    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        return [999], []


class _RepeatsIds:
    seen: list[int]

    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        self.__dict__.setdefault("seen", []).extend(finished_gen_req_ids)
        return list(self.seen), []


def test_get_finished_may_only_return_ids_handed_in() -> None:
    with pytest.raises(ContractViolation, match="rank 0 returned 999 in finished_saving, which was not handed in"):
        _run(Options(), worker_base=_UnknownIds)
    with pytest.raises(KeyError, match="999"):  # what TRT-LLM's manager does with it
        _run(Options(), worker_base=_UnknownIds, cfg=FAITHFUL)


def test_get_finished_returns_an_id_once() -> None:
    two = [SPEC, RequestSpec(list(range(50, 80)), 6)]
    scheduler, worker, _ = make_connector(Options(match=lambda request, n: (0, False), async_save=True))
    executor = ReferenceExecutor(CFG, connector=(scheduler, type("Worker", (_RepeatsIds, worker), {})))
    with pytest.raises(ContractViolation, match="was not handed in or was already returned"):
        executor.run(two)


class _UnpicklableMeta:
    def build_connector_meta(self, scheduler_output: Any) -> object:
        super().build_connector_meta(scheduler_output)
        return threading.Lock()


def test_metadata_must_survive_the_broadcast() -> None:
    with pytest.raises(ContractViolation, match="build_connector_meta: metadata of type lock is not picklable"):
        _run(Options(), scheduler_base=_UnpicklableMeta)


class _BindWithoutSuper:
    def bind_connector_meta(self, metadata: object) -> None:
        self.stashed = metadata


def test_bind_override_must_call_super() -> None:
    with pytest.raises(ContractViolation, match=r"rank 0's override did not call super\(\).bind_connector_meta"):
        _run(Options(), worker_base=_BindWithoutSuper)


class _InitWithoutSuper:
    def __init__(self, llm_args: Any):
        self.rank = 0


def test_worker_init_must_call_super() -> None:
    with pytest.raises(ContractViolation, match=r"KvCacheConnectorWorker.__init__: rank 0 did not call super"):
        _run(Options(), worker_base=_InitWithoutSuper)


class _FinishedReturnsNone:
    def request_finished(self, request: Any, cache_block_ids: list[int]) -> Any:
        super().request_finished(request, cache_block_ids)
        return None


def test_request_finished_must_answer_with_a_bool() -> None:
    with pytest.raises(ContractViolation, match="request_finished: must return a bool"):
        _run(Options(), scheduler_base=_FinishedReturnsNone)


def test_a_save_that_is_never_reported_stays_pinned_when_the_engine_goes_idle() -> None:
    options = Options(match=lambda request, n: (0, False), async_save=True, finish_delay=10**6)
    scheduler, worker, _ = make_connector(options)
    result = ReferenceExecutor(FAITHFUL, connector=(scheduler, worker)).run([SPEC])
    assert result.pending_saves == (result.requests[0].request_id,)
    assert result.pinned_blocks == 3  # 40 + 3 tokens in blocks of 16


def test_a_load_that_is_never_reported_times_out() -> None:
    options = Options(async_load=True, finish_delay=10**6, match=lambda request, n: (16, True))
    cfg = ExecutorConfig(tokens_per_block=16, num_blocks=32, max_seq_len=128, idle_timeout_s=0.2)
    with pytest.raises(ContractViolation, match=r"no progress for 0.2s; not reported by every rank: saves \[\], loads \[1\]"):
        _run(options, cfg=cfg)
