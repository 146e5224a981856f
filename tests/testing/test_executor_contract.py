"""The executor drives a connector exactly as TRT-LLM's own connector tests say TRT-LLM does.

Numbers follow ``tests/integration/defs/llmapi/test_llm_api_connector.py``: 32 tokens per block, a
48-token prompt, 32 generated tokens; chunk 128 with a 256-token prompt.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import pytest

from kvbm_core.testing import (
    ExecutorConfig,
    KvCacheRetentionConfig,
    ReferenceExecutor,
    RequestSpec,
    TokenRangeRetentionConfig,
    greedy_decode,
)

from .recording_connector import Options, make_connector

B = 32
P = 48
N = 32
LAYERS = 3  # the tiny preset
CFG = ExecutorConfig(tokens_per_block=B, num_blocks=64, max_seq_len=512)
PROMPT = [(7 * i + 3) % 512 for i in range(P)]


def _no_match(request, num_computed_tokens):
    return 0, False


def _run(cfg: ExecutorConfig, options: Options, specs: list[RequestSpec]):
    scheduler, worker, shared = make_connector(options)
    executor = ReferenceExecutor(cfg, connector=(scheduler, worker))
    return executor, executor.run(specs), shared


MODES = [(False, "1.2"), (True, "1.2"), (True, "1.3")]


@pytest.mark.parametrize("overlap, era", MODES, ids=["plain", "overlap-1.2", "overlap-1.3"])
def test_scheduler_outputs_and_call_counts(overlap: bool, era: str) -> None:
    cfg = replace(CFG, overlap_scheduler=overlap, trtllm=era)
    executor, result, shared = _run(cfg, Options(match=_no_match), [RequestSpec(PROMPT, N)])
    assert result.tokens() == [tuple(greedy_decode(executor.model, PROMPT, N))]
    extra = int(overlap and era == "1.2")  # 1.2's overlap loop runs one more forward per request
    forwards = N + extra

    assert shared.count("register_kv_caches", 0) == 1
    assert shared.count("get_num_new_matched_tokens") == 1
    ((rid, alloc_ids, position),) = shared.args("update_state_after_alloc")
    assert len(alloc_ids) == math.ceil(P / B) and position == 0

    outputs = shared.outputs()
    assert len(outputs) == forwards
    first = outputs[0]
    assert (len(first.new_requests), len(first.cached_requests)) == (1, 0)
    data = first.new_requests[0]
    assert (data.request_id, data.new_tokens, data.new_block_ids) == (rid, PROMPT, alloc_ids)
    assert (data.computed_position, data.num_scheduled_tokens) == (0, P)
    assert hasattr(data, "priorities") == (era == "1.3")
    if era == "1.3":
        assert data.priorities is None and data.cache_salt is None  # no retention config: no priorities
        assert len(data.block_hashes) == P // B  # the chain over full blocks
    reported = list(data.new_block_ids)
    for i, out in enumerate(outputs[1:], start=1):
        assert (len(out.new_requests), len(out.cached_requests)) == (0, 1)
        data = out.cached_requests[0]
        assert len(data.new_tokens) == (0 if overlap and i == 1 else 1)
        assert data.num_scheduled_tokens == 1
        crosses = (data.computed_position + int(overlap)) % B == 0
        assert len(data.new_block_ids) == int(crosses)
        reported += data.new_block_ids

    for method in ("start_load_kv", "wait_for_save", "bind_connector_meta"):
        assert shared.count(method, 0) == forwards, method
    assert shared.count("get_finished", 0) == N + int(overlap)  # the last iteration may have no forward
    for method in ("wait_for_layer_load", "save_kv_layer"):
        layers = [a[0] for a in shared.args(method, 0)]
        assert layers == list(range(LAYERS)) * forwards, method
    ((finished_id, finished_ids),) = shared.args("request_finished")
    assert finished_id == rid and finished_ids == reported
    assert len(finished_ids) == math.ceil((P + N) / B)
    assert all(a == ([], []) for a in shared.args("get_finished", 0))
    assert executor.kv_manager.num_available_blocks == CFG.num_blocks


def test_connector_tokens_are_left_out_of_the_first_computed_position() -> None:
    options = Options(match=lambda request, n: (8, False))
    _, result, shared = _run(CFG, options, [RequestSpec(PROMPT, 2)])
    data = shared.outputs()[0].new_requests[0]
    assert (data.computed_position, data.num_scheduled_tokens) == (0, P - 8)
    assert shared.args("update_state_after_alloc")[0][2] == 8  # context_current_position after the match
    assert result.requests[0].connector_tokens == 8


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_chunked_prefill_reports_every_block_up_front(overlap: bool) -> None:
    cfg = replace(CFG, enable_chunked_prefill=True, max_num_tokens=128, overlap_scheduler=overlap)
    prompt = [(5 * i + 1) % 512 for i in range(256)]
    executor, result, shared = _run(cfg, Options(match=_no_match), [RequestSpec(prompt, B)])
    assert result.tokens() == [tuple(greedy_decode(executor.model, prompt, B))]
    outputs = shared.outputs()
    first, second, third = outputs[0].new_requests[0], outputs[1].cached_requests[0], outputs[2].cached_requests[0]
    assert (first.computed_position, len(first.new_tokens), len(first.new_block_ids), first.num_scheduled_tokens) == (
        0,
        256,
        8,
        128,
    )
    assert (second.computed_position, second.new_tokens, second.new_block_ids, second.num_scheduled_tokens) == (
        128,
        [],
        [],
        128,
    )
    assert (len(third.new_tokens), third.num_scheduled_tokens) == (0 if overlap else 1, 1)
    assert len(shared.args("update_state_after_alloc")[0][1]) == 8
    assert len(shared.args("request_finished")[0][1]) == math.ceil((256 + B) / B)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_async_save_is_reported_once_by_get_finished(overlap: bool) -> None:
    options = Options(match=_no_match, async_save=True)
    _, _, shared = _run(replace(CFG, overlap_scheduler=overlap), options, [RequestSpec(PROMPT, N)])
    polls = shared.args("get_finished", 0)
    assert len(polls) == N + int(overlap)
    ((rid, _),) = shared.args("request_finished")
    assert polls[:-1] == [([], [])] * (len(polls) - 1)
    assert polls[-1] == ([rid], [])


def test_async_save_pins_blocks_until_every_rank_reports() -> None:
    cfg = replace(CFG, num_blocks=6, tp_size=2)
    options = Options(match=_no_match, async_save=True, finish_delay=1, lag=2, lag_rank=1)
    first = RequestSpec(PROMPT, 4)  # holds 2 blocks
    big = RequestSpec([(3 * i) % 512 for i in range(150)], 40)  # needs all 6 blocks
    executor, result, shared = _run(cfg, options, [first, big])
    assert result.tokens() == [tuple(greedy_decode(executor.model, s.prompt, s.max_new_tokens)) for s in (first, big)]

    rid_first, rid_big = (r.request_id for r in result.requests)
    polls = [(i, rank, args) for i, (m, rank, args) in enumerate(shared.calls) if m == "get_finished"]
    for rank in (0, 1):
        handed = [args for _, r, args in polls if r == rank and args[0]]
        assert [a[0] for a in handed] == [[rid_first], [rid_big]]  # each id handed in once, on every rank
    first_big_output = next(
        i
        for i, (m, _, a) in enumerate(shared.calls)
        if m == "build_connector_meta" and any(d.request_id == rid_big for d in a[0].new_requests)
    )
    handed_at = next(k for k, (_, r, args) in enumerate(polls) if r == 1 and args[0] == [rid_first])
    reported_by_rank1_at = polls[handed_at + 2 * (1 + 2)][0]  # rank 1 answers 1 + 2 polls after hand-in
    assert first_big_output > reported_by_rank1_at
    # the engine went idle with the big request's save unreported: its blocks stay pinned (TRT-LLM
    # polls get_finished again only once a request arrives)
    assert (result.pending_saves, result.pinned_blocks) == ((rid_big,), 6)
    executor.run([RequestSpec(PROMPT[:20], 8)])  # waits for those blocks; the polls release them
    assert rid_big not in executor.connector.outstanding()[0]


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_async_onboard_parks_the_request_until_get_finished(overlap: bool) -> None:
    options = Options(match=lambda request, n: (16, True))
    _, result, shared = _run(replace(CFG, overlap_scheduler=overlap), options, [RequestSpec(PROMPT, N)])
    polls = shared.args("get_finished", 0)
    assert len(polls) == N + 1 + int(overlap)
    rid = result.requests[0].request_id
    assert polls[0] == ([], [rid])
    outputs = shared.outputs()
    assert (outputs[0].new_requests, outputs[0].cached_requests) == ([], [])  # parked before the forward
    data = outputs[1].new_requests[0]
    assert (data.computed_position, len(data.new_tokens), data.num_scheduled_tokens) == (16, P, P - 16)
    assert result.requests[0].async_load and result.counters.async_loads == 1


def test_tp_ranks_share_the_leaders_args_only_on_rank_0() -> None:
    executor, result, shared = _run(replace(CFG, tp_size=2), Options(match=_no_match), [RequestSpec(PROMPT, 3)])
    leader_args = executor.scheduler._llm_args
    assert executor.workers[0]._llm_args is leader_args and executor.workers[1]._llm_args is not leader_args
    mappings = [w._llm_args.parallel_config.to_mapping() for w in executor.workers]
    assert [(m.rank, m.tp_size, m.world_size) for m in mappings] == [(0, 2, 2), (1, 2, 2)]
    assert (
        shared.args("register_kv_caches", 0) == shared.args("register_kv_caches", 1) == [((64, LAYERS, 2, 1 * B * 16),)]
    )
    assert executor.workers[0]._metadata is not executor.workers[1]._metadata  # each rank unpickles its copy
    assert result.tokens() == [tuple(greedy_decode(executor.model, PROMPT, 3))]


def test_cuda_graph_mode_skips_layer_hooks_on_decode_only_steps() -> None:
    options = Options(match=_no_match, use_forward_pass_callable=True)
    _, result, shared = _run(replace(CFG, cuda_graphs=True), options, [RequestSpec(PROMPT, 6)])
    assert result.counters.forwards == 6 and result.counters.forwards_with_layer_hooks == 1
    assert shared.count("wait_for_layer_load", 0) == shared.count("save_kv_layer", 0) == LAYERS
    assert shared.count("start_load_kv", 0) == shared.count("wait_for_save", 0) == 6
    methods = [m for m, rank, _ in shared.calls if rank == 0]
    assert methods.count("forward_pass_callable") == 6 + 1  # the warmup forward runs it too...
    assert methods.index("forward_pass_callable") < methods.index("register_kv_caches")  # ...before registration


def test_cancelling_a_parked_request_finishes_it_without_a_forward() -> None:
    options = Options(match=lambda request, n: (32, True), finish_delay=50)
    executor, result, shared = _run(CFG, options, [RequestSpec(PROMPT, 8, cancel_after_tokens=0)])
    assert result.requests[0].cancelled and result.requests[0].tokens == ()
    assert shared.count("wait_for_save", 0) == 0 and result.counters.forwards == 0
    ((_, ids),) = shared.args("request_finished")
    assert len(ids) == math.ceil(P / B)
    assert executor.kv_manager.num_available_blocks == CFG.num_blocks


def test_cancelling_mid_decode_and_before_admission() -> None:
    cfg = replace(CFG, num_blocks=4)
    decoding = RequestSpec(PROMPT, 10, cancel_after_tokens=3)
    never_admitted = RequestSpec([1] * 100, 8, cancel_after_tokens=0)  # 4 blocks: waits behind the first
    _, result, shared = _run(cfg, Options(match=_no_match), [decoding, never_admitted])
    first, second = result.requests
    assert first.cancelled and len(first.tokens) == 3
    assert second.cancelled and second.tokens == ()
    assert shared.count("get_num_new_matched_tokens") == shared.count("request_finished") == 1
    ((rid, ids),) = shared.args("request_finished")
    assert rid == first.request_id and len(ids) == math.ceil((P + 3 - 1) / B)


def test_scheduler_and_worker_are_built_concurrently() -> None:
    scheduler, worker, shared = make_connector(Options(match=_no_match))
    worker_built = threading.Event()

    class WaitingScheduler(scheduler):  # a leader that needs its rank-0 worker to exist first
        def __init__(self, llm_args):
            assert worker_built.wait(timeout=10), "the worker was not built while the scheduler waited"
            super().__init__(llm_args)

    class SignallingWorker(worker):
        def __init__(self, llm_args):
            super().__init__(llm_args)
            worker_built.set()

    executor = ReferenceExecutor(CFG, connector=(WaitingScheduler, SignallingWorker))
    assert executor.run([RequestSpec(PROMPT, 2)]).requests[0].tokens


def test_1_3_adds_retention_priorities_and_waits_for_initialization() -> None:
    scheduler, worker, shared = make_connector(Options(match=_no_match))

    class InitialisingScheduler(scheduler):
        def wait_for_initialization(self):
            self.shared.record("wait_for_initialization", None)

    retention = KvCacheRetentionConfig((TokenRangeRetentionConfig(0, B, 80),), decode_retention_priority=10)
    for era in ("1.2", "1.3"):
        executor = ReferenceExecutor(replace(CFG, trtllm=era), connector=(InitialisingScheduler, worker))
        executor.run([RequestSpec(PROMPT, 20, retention=retention, cache_salt="s1")])
    assert shared.count("wait_for_initialization") == 1
    methods = [m for m, _, _ in shared.calls]
    last_registration = max(i for i, m in enumerate(methods) if m == "register_kv_caches")
    assert methods.index("wait_for_initialization") > last_registration
    main_outputs = shared.outputs()[-20:]
    first = main_outputs[0].new_requests[0]
    assert (first.priorities, first.cache_salt) == ([80, 35], "s1")  # block 1 starts at token 32: no range
    decode_blocks = [d for out in main_outputs[1:] for d in out.cached_requests if d.new_block_ids]
    assert [d.priorities for d in decode_blocks] == [[10]]  # the block of position 64
