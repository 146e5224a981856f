"""BlockManager flows, one behaviour per test, in TRT-LLM's call order."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from kvbm_core.hookspecs import hookimpl
from kvbm_core.identity import RequestScope, block_keys, dynamo_sequence_hashes
from kvbm_core.interfaces import TierLevel
from kvbm_core.leader import BlockManager, Match, RequestStateError, SlotState
from kvbm_core.ops import LOADS, NO_REQUEST, STORES, OpResult, Route, StepOps
from kvbm_core.registry import Registry

from .leader_setup import Stager, layout
from .leader_setup import settings as make_settings
from .leader_sim import RequestData

TPB = 4
H2DISK = frozenset({Route.H2DISK})


def ok(ops: StepOps | list, **kw) -> list[OpResult]:
    return [OpResult(op.op_id, True, num_bytes=100 * op.num_blocks, seconds=1e-3, **kw) for op in ops]


def prompt_of(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def run_prefill(bm: BlockManager, rid: int, prompt: list[int], ids: list[int], *, device_tokens: int = 0,
                apply: bool = True, finish: bool = True) -> tuple[Match, StepOps]:
    m = bm.match(rid, prompt, device_tokens)
    bm.allocated(rid, ids)
    new = [RequestData(rid, prompt, ids, device_tokens, len(prompt) - device_tokens - m.num_tokens)]
    ops = bm.schedule(new, [])
    if apply:
        bm.apply_results(ok(ops))
    if finish:
        bm.finish(rid)
    return m, ops


def drain(bm: BlockManager) -> list[StepOps]:
    seen = []
    for _ in range(20):
        ops = bm.schedule([], [])
        seen.append(ops)
        bm.apply_results(ok(ops))
        if not bm.num_pending_ops:
            break
    return seen


class Capture:
    """A real pluggy plugin recording every event hook."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    @hookimpl
    def kvbm_blocks_stored(self, tier, route, keys, seq_hashes):
        self.events.append(("stored", tier, route, keys.copy(), seq_hashes.copy()))

    @hookimpl
    def kvbm_blocks_removed(self, tier, keys, seq_hashes):
        self.events.append(("removed", tier, keys.copy(), seq_hashes.copy()))

    @hookimpl
    def kvbm_blocks_onboarded(self, tier, request_id, num_blocks, num_bytes, seconds):
        self.events.append(("onboarded", tier, request_id, num_blocks, num_bytes, seconds))

    @hookimpl
    def kvbm_blocks_offloaded(self, route, num_blocks, num_bytes, seconds):
        self.events.append(("offloaded", route, num_blocks, num_bytes, seconds))

    @hookimpl
    def kvbm_request_matched(self, request_id, requested_tokens, device_tokens, host_tokens, disk_tokens):
        self.events.append(("matched", request_id, requested_tokens, device_tokens, host_tokens, disk_tokens))

    @hookimpl
    def kvbm_request_finished(self, request_id, queried_blocks, host_hit_blocks, disk_hit_blocks):
        self.events.append(("finished", request_id, queried_blocks, host_hit_blocks, disk_hit_blocks))

    @hookimpl
    def kvbm_transfer_failed(self, route, op_id, request_id, error):
        self.events.append(("failed", route, op_id, request_id, error))

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind]


@pytest.fixture
def captured():
    registry = Registry()
    capture = Capture()
    registry.register(capture, "capture")

    def make(s=None, **kw) -> BlockManager:
        return BlockManager(s or make_settings(), layout(TPB), world_size=1, model_id="test-model",
                            registry=registry, stager=kw.pop("stager", Stager()), **kw)

    return make, capture


# ------------------------------------------------------------------------------------ step contract
def test_first_step_carries_the_worker_config_and_op_ids_increase(make_bm):
    bm = make_bm(make_settings(16, 32))
    cfg = bm.worker_config
    assert [(t.kind, t.level, t.num_slots) for t in cfg.tiers] == [("cpu", TierLevel.HOST, 16),
                                                                    ("disk", TierLevel.DISK, 32)]
    assert cfg.namespace == bm.namespace.digest and len(cfg.namespace) == 16 and cfg.world_size == 1
    first = bm.schedule([], [])
    assert first.worker_config is cfg
    _, ops = run_prefill(bm, 1, prompt_of(13), [0, 1, 2, 3], apply=False)
    assert ops.worker_config is None
    _, ops2 = run_prefill(bm, 2, prompt_of(13, 5000), [4, 5, 6, 7], apply=False)
    ids = [*ops.op_ids.tolist(), *ops2.op_ids.tolist()]
    assert ids == sorted(set(ids)) and len(ids) == 2
    again = pickle.loads(pickle.dumps(first))
    assert again == first and again.worker_config == cfg


# --------------------------------------------------------------------------------- write-through
def test_full_blocks_are_written_through_and_become_matchable(make_bm):
    bm = make_bm()
    prompt = prompt_of(4 * 3 + 2)
    m, ops = run_prefill(bm, 1, prompt, [10, 11, 12, 13], apply=False, finish=False)
    assert m == Match(0, 0, 0)
    (store,) = ops.select(STORES)
    assert store.route == Route.D2H and store.request_id == 1
    assert store.src.tolist() == [10, 11, 12]  # the partial fourth block is not stored
    assert np.array_equal(store.keys, block_keys(bm.namespace, prompt))
    assert bm.match(2, prompt, 0).num_tokens == 0  # written but not complete: never matched
    bm.finish(2)
    assert bm.finish(1) is True  # its store is in flight
    bm.apply_results(ok(ops))
    assert bm.num_requests == 0
    assert bm.match(3, prompt, 0) == Match(12, 3, 0)
    assert bm.stats.offload_blocks_d2h == 3


def test_never_the_whole_prompt_and_never_after_a_partial_device_prefix(make_bm):
    bm = make_bm()
    prompt = prompt_of(16)  # exactly 4 blocks
    run_prefill(bm, 1, prompt, [0, 1, 2, 3])
    m = bm.match(2, prompt, 0)
    assert m.num_tokens == 12  # the last block is computed again
    bm.finish(2)
    assert bm.match(3, prompt, 5).num_tokens == 0  # 5 device tokens: not block-aligned
    bm.finish(3)
    m = bm.match(4, prompt, 8)  # 2 device blocks: matching starts after them
    assert m == Match(4, 1, 0)
    bm.finish(4)
    assert bm.match(5, prompt, 12).num_tokens == 0  # nothing left that may be promised


def test_sync_onboard_pairs_slots_with_device_ids_after_the_device_prefix(make_bm):
    bm = make_bm()
    prompt = prompt_of(4 * 5 + 1)
    run_prefill(bm, 1, prompt, [0, 1, 2, 3, 4, 5])
    keys = block_keys(bm.namespace, prompt)
    m = bm.match(2, prompt, 8)
    assert m == Match(12, 3, 0)
    ids = [20, 21, 22, 23, 24, 25]
    bm.allocated(2, ids)
    # first report: computed_position excludes the promised tokens (it is the device prefix)
    ops = bm.schedule([RequestData(2, prompt, ids, 8, 21 - 8 - 12)], [])
    (load,) = ops.select(LOADS)
    assert load.route == Route.H2D and load.dst.tolist() == [22, 23, 24]
    assert np.array_equal(load.keys, keys[2:5])
    assert (bm.host.keys[load.src] == keys[2:5]).all()
    assert not ops.select(STORES)  # block 5 is partial; blocks 0-4 device or onboarded
    bm.apply_results(ok(ops))
    assert bm.stats.onboard_blocks_h2d == 3 and not bm.host.holds.any()


def test_disk_blocks_are_staged_into_the_host_before_they_are_promised(make_bm):
    stager = Stager()
    bm = make_bm(make_settings(4, 32, disk_filter=False), stager=stager)
    prompt = prompt_of(4 * 6 + 3)
    keys = block_keys(bm.namespace, prompt)
    run_prefill(bm, 1, prompt, list(range(7)))
    drain(bm)  # every block reached the disk; the host (4 slots) kept the last ones
    run_prefill(bm, 9, prompt_of(4 * 4 + 1, 9000), list(range(20, 25)))  # pushes them out of the host
    drain(bm)
    assert not bm.host.matchable(bm.host.lookup(keys)).any()
    m = bm.match(2, prompt, 0)
    (op,) = stager.ops
    assert op.route == Route.DISK2H and op.num_blocks == 4  # as many as the host has room for
    assert m == Match(16, 0, 4) and bm.stats.staged_blocks_disk2h == 4
    assert (bm.host.keys[bm.host.lookup(keys[:4])] == keys[:4]).all()  # now host blocks, held
    bm.allocated(2, list(range(10, 17)))
    ops = bm.schedule([RequestData(2, prompt, list(range(10, 17)), 0, len(prompt) - 16)], [])
    (load,) = ops.select(LOADS)
    assert load.route == Route.H2D and load.dst.tolist() == [10, 11, 12, 13]
    bm.apply_results(ok(ops))
    assert bm.stats.onboard_blocks_h2d == 4


def test_a_block_that_fails_staging_on_any_rank_is_dropped_and_never_promised(make_bm):
    stager = Stager(world_size=2)
    stager.bad = {1: (2,)}  # rank 1 finds the third block bad
    bm = make_bm(make_settings(8, 32, disk_filter=False), world_size=2, stager=stager)
    prompt = prompt_of(4 * 6 + 3)
    keys = block_keys(bm.namespace, prompt)
    bm.recovered("disk", np.arange(6), keys)  # on disk only
    m = bm.match(1, prompt, 0)
    assert m == Match(8, 0, 2)  # the promise stops before the bad block
    assert bm.disk.lookup(keys[2:3])[0] == -1  # gone from the disk
    assert bm.host.matchable(bm.host.lookup(keys[3:6])).all()  # the others were staged all the same
    bm.finish(1)
    bm.verify()


def test_nothing_below_the_host_is_promised_when_a_rank_cannot_be_reached(make_bm):
    stager = Stager()
    stager.reachable = False
    bm = make_bm(make_settings(8, 32), stager=stager)
    prompt = prompt_of(4 * 3 + 1)
    bm.recovered("disk", np.arange(3), block_keys(bm.namespace, prompt))
    assert bm.match(1, prompt, 0) == Match(0, 0, 0) and not stager.ops
    bm.finish(1)


def test_chunked_prefill_stores_each_chunk_after_it_is_computed(make_bm):
    bm = make_bm()
    prompt = prompt_of(4 * 5)
    ids = [0, 1, 2, 3, 4]
    bm.match(1, prompt, 0)
    bm.allocated(1, ids)
    ops = bm.schedule([RequestData(1, prompt, ids, 0, 6)], [])  # chunk of 6: block 0 full
    assert ops.src.tolist() == [0]
    ops = bm.schedule([], [RequestData(1, [], [], 6, 6)])  # 12: blocks 1, 2
    assert ops.src.tolist() == [1, 2]
    ops = bm.schedule([], [RequestData(1, [], [], 12, 8)])  # 20: blocks 3, 4
    assert ops.src.tolist() == [3, 4]


def test_decode_blocks_and_overlap_zero_token_steps(make_bm):
    bm = make_bm()
    prompt = prompt_of(6)
    bm.match(1, prompt, 0)
    bm.allocated(1, [0, 1])
    assert bm.schedule([RequestData(1, prompt, [0, 1], 0, 6)], []).src.tolist() == [0]
    # overlap scheduler: the step computing position 6 does not know its token yet
    assert len(bm.schedule([], [RequestData(1, [], [], 6, 1)])) == 0
    # position 7 fills block 1, but token 7 is reported only with the next step: the store waits
    assert len(bm.schedule([], [RequestData(1, [77], [], 7, 1)])) == 0
    ops = bm.schedule([], [RequestData(1, [78], [2], 8, 1)])  # token 7 known, block 2 appears
    assert ops.src.tolist() == [1]
    seq = dynamo_sequence_hashes([*prompt, 77, 78], TPB)
    assert bm.host.seq[ops.dst[0]] == seq[1]


def test_two_requests_computing_one_prefix_store_it_once(captured):
    make, capture = captured
    bm = make()
    prompt = prompt_of(4 * 3 + 1)
    for rid in (1, 2):
        bm.match(rid, prompt, 0)
        bm.allocated(rid, [rid * 10 + i for i in range(4)])
    ops = bm.schedule([RequestData(1, prompt, [10, 11, 12, 13], 0, 13),
                       RequestData(2, prompt, [20, 21, 22, 23], 0, 13)], [])
    (store,) = ops.select(STORES)
    assert store.request_id == 1 and store.num_blocks == 3
    # a third computes it while the first write is in flight: skipped too (writing counts)
    bm.match(3, prompt, 0)
    bm.allocated(3, [30, 31, 32, 33])
    assert len(bm.schedule([RequestData(3, prompt, [30, 31, 32, 33], 0, 13)], [])) == 0
    bm.apply_results(ok(ops))
    assert len(capture.of("stored")) == 1 and bm.stats.offload_blocks_d2h == 3
    assert bm.finish(2) is False and bm.finish(3) is False and bm.finish(1) is False  # nothing in flight


def test_finish_says_whether_an_operation_is_still_in_flight(make_bm):
    bm = make_bm()
    prompt = prompt_of(4 * 3 + 1)
    bm.match(1, prompt, 0)
    bm.allocated(1, [0, 1, 2, 3])
    ops = bm.schedule([RequestData(1, prompt, [0, 1, 2, 3], 0, 13)], [])
    assert bm.finish(1) is True  # its store has no result yet
    bm.apply_results(ok(ops))
    assert bm.finish(1) is False and bm.num_requests == 0


# ------------------------------------------------------------------------------------ the pipelines
def test_cpu_only_pipeline_offloads_device_to_host_only(make_bm):
    bm = make_bm(make_settings(16))
    for rid in range(3):  # the same prompt again and again: never anything but d2h / h2d
        run_prefill(bm, rid, prompt_of(4 * 4 + 1), list(range(5)))
    routes = {op.route for ops in drain(bm) for op in ops}
    assert routes <= {Route.D2H, Route.H2D}
    assert bm.stats.blocks[Route.H2DISK] == bm.stats.blocks[Route.DISK2H] == 0
    assert bm.stats.offload_blocks_d2h == 4 and bm.stats.onboard_blocks_h2d == 8


def test_cpu_disk_pipeline_sends_blocks_to_disk_on_their_second_sighting(make_bm):
    bm = make_bm(make_settings(16, 32))
    prompt = prompt_of(4 * 4 + 1)
    run_prefill(bm, 1, prompt, list(range(5)))  # first store: frequency 1, stays in the host
    assert not any(op.route == Route.H2DISK for ops in drain(bm) for op in ops)
    m, ops = run_prefill(bm, 2, prompt, list(range(5)), apply=False, finish=False)  # a host hit: 2
    assert m.host_blocks == 4
    assert [op.route for op in ops] == [Route.H2D, Route.H2DISK]
    (h2disk,) = ops.select(H2DISK)
    assert h2disk.request_id == NO_REQUEST and h2disk.num_blocks == 4
    assert np.array_equal(h2disk.keys, block_keys(bm.namespace, prompt))
    assert (bm.host.state[h2disk.src] == SlotState.HELD).all()  # two readers: the load and the copy
    assert (bm.host.holds[h2disk.src] == 2).all()
    bm.apply_results(ok(ops))
    bm.finish(2)
    assert bm.stats.offload_blocks_h2disk == 4
    assert (bm.disk.matchable(bm.disk.lookup(h2disk.keys))).all()
    # already on disk: not offered again
    run_prefill(bm, 3, prompt, list(range(5)))
    assert not any(op.route == Route.H2DISK for ops in drain(bm) for op in ops)


def test_a_recomputed_duplicate_counts_as_a_sighting(make_bm):
    bm = make_bm(make_settings(16, 32))
    prompt = prompt_of(4 * 2 + 1)
    run_prefill(bm, 1, prompt, [0, 1, 2])
    assert not [op for ops in drain(bm) for op in ops]
    # the same blocks computed again by a request the leader never matched (block reuse off)
    bm.allocated(3, [8, 9, 10])
    ops = bm.schedule([RequestData(3, prompt, [8, 9, 10], 0, 9)], [])
    assert not ops.select(STORES)  # a duplicate of what the host holds: skipped, but offered
    (h2disk,) = ops.select(H2DISK)
    assert h2disk.num_blocks == 2
    bm.apply_results(ok(ops))
    assert bm.finish(3) is False


def test_filter_off_sends_every_host_block_to_disk(make_bm):
    bm = make_bm(make_settings(16, 32, disk_filter=False))
    run_prefill(bm, 1, prompt_of(4 * 3 + 1), list(range(4)))
    routes = [op.route for ops in drain(bm) for op in ops]
    assert routes == [Route.H2DISK] and bm.stats.offload_blocks_h2disk == 3


def test_disk_only_pipeline_stores_through_a_staging_host_tier(make_bm):
    bm = make_bm(make_settings(None, 16))
    (staging, disk) = bm.worker_config.tiers
    assert (staging.kind, staging.level, disk.kind) == ("cpu", TierLevel.HOST, "disk")
    assert staging.spec is not None and 1 <= staging.num_slots <= 16  # not listed in the settings
    _, ops = run_prefill(bm, 1, prompt_of(4 * 3 + 1), list(range(4)))
    assert [op.route for op in ops] == [Route.D2H]
    (h2disk,) = [op for ops in drain(bm) for op in ops]  # no filter: every block goes on to disk
    assert h2disk.route == Route.H2DISK and h2disk.num_blocks == 3
    assert bm.stats.offload_blocks_d2h == bm.stats.offload_blocks_h2disk == 3


# -------------------------------------------------------------------------------------- failures
def test_failed_store_frees_its_slots_and_is_not_counted(captured):
    make, capture = captured
    bm = make()
    prompt = prompt_of(4 * 2 + 1)
    _, ops = run_prefill(bm, 1, prompt, [0, 1, 2], apply=False)
    bm.apply_results([OpResult(op.op_id, False, error="disk full") for op in ops])
    assert bm.host.count(SlotState.FREE) == bm.host.num_slots
    assert bm.match(2, prompt, 0).num_tokens == 0
    assert bm.stats.offload_blocks_d2h == 0 and bm.stats.failed_ops == 1
    assert capture.of("failed") == [("failed", "d2h", ops.op_ids[0], 1, "disk full")]
    assert not capture.of("stored") and bm.num_requests == 1  # request 2 is still matched
    bm.finish(2)
    assert bm.num_requests == 0


def test_failed_load_drops_the_bad_slots_and_the_requests_stores(captured):
    make, capture = captured
    bm = make()
    prompt = prompt_of(4 * 4 + 3)
    run_prefill(bm, 1, prompt, list(range(5)))
    keys = block_keys(bm.namespace, prompt)
    m = bm.match(2, prompt, 0)
    assert m.host_blocks == 4
    longer = [*prompt, *prompt_of(9, 7000)]
    bm.allocated(2, list(range(10, 17)))
    # it computes blocks after the promised ones in the same step as its (synchronous) loads
    ops = bm.schedule([RequestData(2, longer, list(range(10, 17)), 0, len(longer) - 16)], [])
    (load,) = ops.select(LOADS)
    (store,) = ops.select(STORES)
    # the store reports first, success: held back until the request's loads are through
    bm.apply_results(ok([store]))
    assert (bm.host.state[store.dst] == SlotState.WRITING).all()
    bm.apply_results([OpResult(load.op_id, False, error="checksum", failed_blocks=(1, 2))])
    assert 2 in bm.failed_requests
    # the failing slots leave the index; the other promised ones stay matchable
    found = bm.host.lookup(keys)
    assert bm.host.matchable(found).tolist() == [True, False, False, True]
    # the store computed on top of the failed load is dropped
    assert (bm.host.state[store.dst] == SlotState.FREE).all()
    assert bm.match(3, longer, 0).num_tokens == 4
    bm.finish(3)
    removed = capture.of("removed")
    assert len(removed) == 1 and np.array_equal(removed[0][2], keys[1:3])
    # no further stores for the failed request
    assert len(bm.schedule([], [RequestData(2, [1] * 8, [17, 18], len(longer), 8)])) == 0
    assert bm.finish(2) is False and bm.num_requests == 0
    bm.verify()


def test_store_results_wait_for_the_loads_of_their_request(make_bm):
    bm = make_bm()
    prompt = prompt_of(4 * 2 + 1)
    run_prefill(bm, 1, prompt, [0, 1, 2])
    longer = [*prompt, *prompt_of(8, 7000)]
    bm.match(2, longer, 0)
    bm.allocated(2, list(range(10, 15)))
    ops = bm.schedule([RequestData(2, longer, list(range(10, 15)), 0, len(longer) - 8)], [])
    load, store = ops.select(LOADS)[0], ops.select(STORES)[0]
    bm.apply_results(ok([store]))
    assert bm.match(3, longer, 0).num_tokens == 8  # the new blocks are not matchable yet
    bm.finish(3)
    bm.apply_results(ok([load]))
    assert bm.match(4, longer, 0).num_tokens == 16
    bm.verify()


def test_unknown_and_duplicate_results_are_ignored(make_bm):
    bm = make_bm()
    _, ops = run_prefill(bm, 1, prompt_of(9), [0, 1, 2], apply=False)
    bm.apply_results(ok(ops))
    bm.apply_results(ok(ops) + [OpResult(999, True)])
    assert bm.stats.offload_blocks_d2h == 2


# --------------------------------------------------------------------------------------- finishing
def test_finish_semantics(make_bm):
    bm = make_bm()
    prompt = prompt_of(4 * 3 + 1)
    assert bm.finish(42) is False  # never seen
    run_prefill(bm, 1, prompt, [0, 1, 2, 3])
    # cancelled after match, before allocation: pins released, nothing planned
    assert bm.match(2, prompt, 0).host_blocks == 3
    assert bm.host.holds.sum() == 3
    assert bm.finish(2) is False and not bm.host.holds.any() and bm.num_requests == 0
    # cancelled after allocation, before any step
    bm.match(3, prompt, 0)
    bm.allocated(3, [5, 6, 7, 8])
    assert bm.finish(3) is False and not bm.host.holds.any()
    assert len(bm.schedule([], [])) == 0  # its loads never go out
    # finished with a load in flight: True, forgotten once the result is in
    bm.match(4, prompt, 0)
    bm.allocated(4, [5, 6, 7, 8])
    ops = bm.schedule([], [])
    assert bm.request_ops(4) == set(ops.op_ids.tolist())
    assert bm.finish(4) is True and bm.finish(4) is True
    assert bm.num_requests == 1
    bm.apply_results(ok(ops))
    assert bm.num_requests == 0 and bm.request_ops(4) == set() and bm.finish(4) is False


def test_out_of_order_calls_are_typed_errors(make_bm):
    bm = make_bm()
    prompt = prompt_of(9)
    bm.match(1, prompt, 0)
    bm.match(1, prompt, 0)  # again before anything happened: allowed (starts over)
    bm.allocated(1, [0, 1, 2])
    with pytest.raises(RequestStateError, match="request 1"):
        bm.allocated(1, [0, 1, 2])
    ops = bm.schedule([RequestData(1, prompt, [0, 1, 2], 0, 9)], [])
    assert len(ops)
    with pytest.raises(RequestStateError):
        bm.match(1, prompt, 0)


def test_reported_prompt_must_be_the_matched_one(make_bm):
    bm = make_bm()
    prompt = prompt_of(9)
    run_prefill(bm, 1, prompt, [0, 1, 2])
    assert bm.match(2, prompt, 0).num_tokens == 8
    bm.allocated(2, [5, 6, 7])
    ops = bm.schedule([RequestData(2, prompt_of(9, 3), [5, 6, 7], 0, 1)], [])
    assert 2 in bm.failed_requests and not ops.select(STORES)


# ------------------------------------------------------------------------------------- priorities
@pytest.mark.parametrize(
    ("threshold", "priorities", "stored"),
    [
        (0, [10, 10, 10, 10, 10], 4),
        (50, [60, 60, 40, 60, 60], 2),
        (50, None, 0),  # no priorities: TRT-LLM's default 35 is below the threshold
        (30, None, 4),
    ],
)
def test_prefix_priority_filter(make_bm, threshold, priorities, stored):
    bm = make_bm(make_settings(16, min_priority=threshold))
    prompt = prompt_of(4 * 4 + 1)
    bm.match(1, prompt, 0)
    bm.allocated(1, [0, 1, 2, 3, 4])
    ops = bm.schedule([RequestData(1, prompt, [0, 1, 2, 3, 4], 0, 10, priorities)], [])
    later = bm.schedule([], [RequestData(1, [], [], 10, 7)])
    assert len(ops.src) + len(later.src) == stored
    if priorities:
        assert bm.host.priority[ops.dst].tolist() == priorities[: len(ops.dst)]
    decode = bm.schedule([], [RequestData(1, [5, 6, 7, 8], [5], 17, 4, [99])])
    assert len(decode.src) == (1 if stored == 4 else 0)  # stopped for the rest of the request


# -------------------------------------------------------------------------------- eviction pressure
def test_promised_blocks_survive_eviction_pressure_until_onboarded(make_bm):
    bm = make_bm(make_settings(4))
    prompt = prompt_of(4 * 3 + 1)
    run_prefill(bm, 1, prompt, list(range(4)))
    keys = block_keys(bm.namespace, prompt)
    assert bm.match(2, prompt, 0).host_blocks == 3
    promised = bm.host.lookup(keys)
    # other requests fill the host while request 2 waits for allocation
    for rid in (3, 4, 5):
        run_prefill(bm, rid, prompt_of(4 * 3 + 1, rid * 1000), list(range(10, 14)))
    assert np.array_equal(bm.host.lookup(keys), promised)
    assert (bm.host.state[promised] == SlotState.HELD).all()
    assert bm.stats.offload_blocks_d2h == 3 + 3  # one free slot per request; the held 3 stay
    bm.allocated(2, list(range(20, 24)))
    ops = bm.schedule([], [])
    (load,) = ops.select(LOADS)
    assert load.src.tolist() == promised.tolist()
    bm.apply_results(ok(ops))
    bm.finish(2)
    run_prefill(bm, 9, prompt_of(4 * 3 + 1, 9000), list(range(10, 14)))
    assert not bm.host.matchable(bm.host.lookup(keys)).all()  # now evictable, and evicted
    bm.verify()


def test_recovered_disk_blocks_are_matchable(captured):
    make, capture = captured
    bm = make(make_settings(None, 16))
    prompt = prompt_of(4 * 3 + 1)
    keys = block_keys(bm.namespace, prompt)
    bm.recovered("disk", np.array([7, 8, 9]), keys)
    assert bm.match(1, prompt, 0) == Match(12, 0, 3)
    restored, staged = capture.of("stored")
    assert restored[1:3] == ("disk", "restored") and not restored[4].any()
    assert staged[1:3] == ("cpu", "disk2h") and np.array_equal(staged[3], keys)
    with pytest.raises(Exception, match="gds"):
        bm.recovered("gds", np.array([1]), keys[:1])


# --------------------------------------------------------------------------------- events and stats
def test_events_and_stats(captured):
    make, capture = captured
    bm = make(make_settings(2, cache_stats={"max_requests": 2}))
    prompt = prompt_of(4 * 2 + 1)
    run_prefill(bm, 1, prompt, [0, 1, 2])
    run_prefill(bm, 2, prompt, [3, 4, 5])
    run_prefill(bm, 3, prompt_of(4 * 2 + 1, 5000), [6, 7, 8])  # evicts request 1's blocks
    assert capture.of("matched") == [
        ("matched", 1, 9, 0, 0, 0),
        ("matched", 2, 9, 0, 8, 0),
        ("matched", 3, 9, 0, 0, 0),
    ]
    assert capture.of("finished") == [("finished", 1, 2, 0, 0), ("finished", 2, 2, 2, 0), ("finished", 3, 2, 0, 0)]
    assert capture.of("onboarded") == [("onboarded", "cpu", 2, 2, 200, 1e-3)]
    keys = block_keys(bm.namespace, prompt)
    stored = capture.of("stored")
    assert [s[1:3] for s in stored] == [("cpu", "d2h"), ("cpu", "d2h")]
    assert np.array_equal(stored[0][3], keys)
    assert stored[0][4].tolist() == dynamo_sequence_hashes(prompt, TPB).tolist()
    (removed,) = capture.of("removed")
    assert removed[1] == "cpu" and np.array_equal(removed[2], keys)
    assert [e[1:3] for e in capture.of("offloaded")] == [("d2h", 2), ("d2h", 2)]
    stats = bm.stats
    assert stats.matched_tokens == 8 and stats.requested_tokens == 27
    assert stats.window_requests == 2  # requests 2 and 3
    assert stats.host_hit_rate == pytest.approx(2 / 4) and stats.disk_hit_rate == 0


def test_cache_salt_separates_requests(make_bm):
    bm = make_bm()
    prompt = prompt_of(9)
    m = bm.match(1, prompt, 0, scope=RequestScope("tenant-a"))
    bm.allocated(1, [0, 1, 2])
    ops = bm.schedule([RequestData(1, prompt, [0, 1, 2], 0, 9)], [])
    assert np.array_equal(ops.keys, block_keys(bm.namespace, prompt, RequestScope("tenant-a")))
    bm.apply_results(ok(ops))
    bm.finish(1)
    assert m.num_tokens == 0
    assert bm.match(2, prompt, 0).num_tokens == 0
    assert bm.match(3, prompt, 0, scope=RequestScope("tenant-b")).num_tokens == 0
    assert bm.match(4, prompt, 0, scope=RequestScope("tenant-a")).num_tokens == 8


def test_tiny_tier_full_of_held_blocks_skips_offloads(make_bm):
    bm = make_bm(make_settings(2))
    prompt = prompt_of(4 * 2 + 1)
    run_prefill(bm, 1, prompt, [0, 1, 2])
    bm.match(2, prompt, 0)  # holds both slots
    _, ops = run_prefill(bm, 3, prompt_of(4 * 2 + 1, 5000), [5, 6, 7])
    assert len(ops) == 0
    bm.finish(2)
    bm.verify()


def test_a_cached_report_without_a_first_report_is_never_stored(make_bm):
    bm = make_bm()
    # unknown request: its tokens are a delta of a prefix the leader never saw
    assert len(bm.schedule([], [RequestData(5, prompt_of(8), [0, 1], 8, 4)])) == 0
    # known, finished and forgotten, then reported again
    run_prefill(bm, 6, prompt_of(9), [0, 1, 2])
    assert len(bm.schedule([], [RequestData(6, prompt_of(8, 50), [3, 4], 9, 8)])) == 0
    assert bm.stats.offload_blocks_d2h == 2 and bm.num_requests == 0


# --------------------------------------------------------------------------- a host tier that grows
def test_a_growing_host_tier_is_used_only_as_far_as_the_ranks_that_reported_have_it(make_bm):
    bm = make_bm(make_settings(8), world_size=2, host_grows=True)
    prompt = prompt_of(4 * 3 + 1)
    _, ops = run_prefill(bm, 1, prompt, [0, 1, 2, 3], apply=False)
    assert not ops.select(STORES)  # no rank reported its tier usable yet: nothing is stored
    bm.tier_ready(0, "cpu", 2)
    assert bm.host.usable == 2  # rank 1 not heard from yet: it does not hold rank 0 back
    bm.tier_ready(1, "cpu", 1)  # a rank behind the others: never shrinks (its refusals are dropped)
    bm.tier_ready(0, "cpu", 1)  # a late, smaller report never shrinks what a rank has
    assert bm.host.usable == 2
    _, ops = run_prefill(bm, 2, prompt_of(4 * 3 + 1, 7000), [4, 5, 6, 7], apply=False)
    (store,) = ops.select(STORES)
    assert store.dst.tolist() == [0, 1] and len(store.src) == 2  # the third block found no usable slot
    bm.tier_ready(0, "cpu", 8)
    assert bm.host.usable == 2  # rank 1 still has 1
    bm.tier_ready(1, "cpu", 99)
    assert bm.host.usable == 8
    bm.verify()
