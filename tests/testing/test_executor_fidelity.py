"""The reference executor behaves as TensorRT-LLM's executor and connector manager do, line by line
where a connector can tell: the 1.2 unpin loop, request objects, cache salts, errors, idling."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from kvbm_core.testing import ExecutorConfig, ExecutorStopped, ReferenceExecutor, RequestSpec, greedy_decode

from .recording_connector import Options, make_connector

B = 16
CFG = ExecutorConfig(tokens_per_block=B, num_blocks=64, max_seq_len=256, max_batch_size=8)


def _prompt(seed: int, n: int = 40) -> list[int]:
    return [(seed * 131 + 7 * i) % 512 for i in range(n)]


def _no_match(request: Any, n: int) -> tuple[int, bool]:
    return 0, False


@pytest.mark.parametrize("line, unpinned", [("1.2", 1), ("1.3", 3)])
def test_saves_reported_together_unpin_one_per_poll_on_1_2(line: str, unpinned: int) -> None:
    """TensorRT-LLM 1.2 leaves its unpin loop after the first request; 1.3 unpins every one."""
    scheduler, worker, _ = make_connector(Options(match=_no_match, async_save=True))
    executor = ReferenceExecutor(replace(CFG, trtllm=line), connector=(scheduler, worker))
    specs = [RequestSpec(_prompt(s), 1) for s in range(3)]  # three prefills that finish in one iteration
    result = executor.run(specs)
    assert len(result.pending_saves) == 3 - unpinned
    assert result.pinned_blocks == 3 * (len(result.pending_saves))  # 41 tokens: 3 blocks each


def test_the_scheduler_matches_with_the_binding_and_finishes_with_the_python_request() -> None:
    seen: dict[str, Any] = {}

    def match(request: Any, n: int) -> tuple[int, bool]:
        seen["match"] = request
        return 0, False

    scheduler, worker, shared = make_connector(Options(match=match))

    class Finishing(scheduler):
        def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
            seen["finished"] = request
            return super().request_finished(request, cache_block_ids)

    executor = ReferenceExecutor(CFG, connector=(Finishing, worker))
    executor.run([RequestSpec(_prompt(1), 2, cache_salt="tenant-a", lora_task_id=4)])
    binding, python = seen["match"], seen["finished"]
    assert binding.is_generation_only_request is False  # a property on the binding...
    assert python.is_generation_only_request() is False  # ...a method on the Python request
    assert not hasattr(binding, "py_request_id") and python.py_request_id == python.request_id
    for request in (binding, python):  # 1.2: the salt only as the runtime's integer id
        assert not hasattr(request, "cache_salt") and isinstance(request.cache_salt_id, int)
        assert request.lora_task_id == 4


def test_1_3_requests_keep_the_salt_string_on_the_python_side() -> None:
    seen: list[Any] = []
    scheduler, worker, shared = make_connector(Options(match=lambda request, n: seen.append(request) or (0, False)))
    executor = ReferenceExecutor(replace(CFG, trtllm="1.3"), connector=(scheduler, worker))
    executor.run([RequestSpec(_prompt(2), 2, cache_salt="tenant-a")])
    assert not hasattr(seen[0], "cache_salt") and isinstance(seen[0].cache_salt_id, int)
    assert shared.outputs()[0].new_requests[0].cache_salt == "tenant-a"


def test_generation_only_requests_are_refused_by_the_manager() -> None:
    scheduler, worker, _ = make_connector(Options(match=_no_match))
    executor = ReferenceExecutor(CFG, connector=(scheduler, worker))
    with pytest.raises(RuntimeError, match="not supported for generation-only requests"):
        executor.run([RequestSpec(_prompt(3), 2, generation_only=True)])


class _FailsInTheForward:
    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        super().wait_for_layer_load(layer_idx, stream)
        if layer_idx == 1 and self.shared.count("wait_for_layer_load", self.rank) == 2:
            raise RuntimeError("boom in layer 1")


def test_an_error_inside_the_forward_fails_every_active_request_and_the_loop_goes_on() -> None:
    scheduler, worker, _ = make_connector(Options(match=_no_match))
    worker = type("Worker", (_FailsInTheForward, worker), {})
    executor = ReferenceExecutor(CFG, connector=(scheduler, worker))
    specs = [RequestSpec(_prompt(4), 3), RequestSpec(_prompt(5), 3), RequestSpec(_prompt(6), 3, arrival_step=5)]
    result = executor.run(specs)
    first, second, later = result.requests
    assert "boom in layer 1" in first.error and "boom in layer 1" in second.error
    assert first.tokens == second.tokens == ()
    assert later.error is None and later.tokens == tuple(greedy_decode(executor.model, specs[2].prompt, 3))
    assert result.counters.forward_errors == 1


def test_with_the_overlap_scheduler_an_error_inside_the_forward_stops_the_executor() -> None:
    scheduler, worker, _ = make_connector(Options(match=_no_match))
    worker = type("Worker", (_FailsInTheForward, worker), {})
    executor = ReferenceExecutor(replace(CFG, overlap_scheduler=True), connector=(scheduler, worker))
    with pytest.raises(ExecutorStopped, match="boom in layer 1"):
        executor.run([RequestSpec(_prompt(7), 3)])


class _FailsInGetFinished:
    def get_finished(self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]) -> Any:
        raise ValueError("boom in get_finished")


def test_an_error_from_get_finished_stops_the_executor() -> None:
    scheduler, worker, _ = make_connector(Options(match=_no_match))
    executor = ReferenceExecutor(CFG, connector=(scheduler, type("Worker", (_FailsInGetFinished, worker), {})))
    with pytest.raises(ValueError, match="boom in get_finished"):
        executor.run([RequestSpec(_prompt(8), 2)])
