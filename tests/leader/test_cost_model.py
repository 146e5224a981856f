"""Cost-aware matching: the model alone, then through the block manager."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from kvbm_core.identity import block_keys
from kvbm_core.leader.cost_model import CostModel
from kvbm_core.ops import OpResult
from kvbm_core.settings.model import CostModelSettings

from .leader_setup import settings as make_settings
from .leader_sim import RequestData

MB = 1_000_000
KINDS = ("cpu", "disk")


def model(**kw) -> CostModel:
    # 4 MB blocks of 32 tokens; recompute at 32k tokens/s = 1 ms per block
    s = CostModelSettings(prefill_tokens_per_s=32_000, fixed_overhead_s=0.0005, **kw)
    return CostModel(s, 4 * MB, 32, {"cpu": 50.0, "disk": 1.5})


def test_fast_host_is_kept_slow_disk_is_dropped():
    m = model()
    assert m.best_prefix(np.zeros(100, np.int8), KINDS) == 100  # 0.08 ms per block vs 1 ms
    assert m.best_prefix(np.ones(100, np.int8), KINDS) == 0  # 2.7 ms per block vs 1 ms
    run = np.array([0] * 20 + [1] * 30, np.int8)
    assert m.best_prefix(run, KINDS) == 20  # host blocks kept, disk tail dropped


def test_a_single_block_does_not_pay_the_fixed_overhead_of_a_slow_path():
    m = model(bandwidth_gbps={"disk": 5.0})  # 0.8 ms per block: worth it, but not for one block
    assert m.best_prefix(np.ones(1, np.int8), KINDS) == 0
    assert m.best_prefix(np.ones(10, np.int8), KINDS) == 10


def test_a_slow_block_between_fast_ones_is_kept_when_the_rest_pays_for_it():
    m = model()
    run = np.array([0] * 5 + [1] + [0] * 30, np.int8)
    assert m.best_prefix(run, KINDS) == len(run)
    assert m.best_prefix(np.array([0, 1, 1, 1, 1, 0], np.int8), KINDS) == 1


def test_settings_override_the_plugin_figure_and_observations_move_it():
    m = model(bandwidth_gbps={"disk": 20.0})
    assert m.bandwidth_gbps("disk") == 20.0 and m.bandwidth_gbps("cpu") == 50.0
    before = m.bandwidth_gbps("disk")
    for _ in range(30):  # 4 MB in 2.5 ms (+0.5 ms overhead) = 1.6 GB/s observed
        m.observe("disk", 4 * MB, 0.003)
    assert abs(m.bandwidth_gbps("disk") - 1.6) < 0.05 < before - 1.6
    m.observe("disk", 0, 1.0)
    m.observe("unknown", 10, 1.0)
    assert abs(m.bandwidth_gbps("disk") - 1.6) < 0.05


def test_disabled_promises_every_matched_block():
    m = model(enabled=False)
    assert m.best_prefix(np.ones(7, np.int8), KINDS) == 7


@hyp_settings(max_examples=80, deadline=None)
@given(run=st.lists(st.integers(0, 1), max_size=40), host=st.floats(0.5, 100), disk=st.floats(0.5, 100))
def test_best_prefix_is_the_brute_force_optimum(run, host, disk):
    m = CostModel(CostModelSettings(prefill_tokens_per_s=32_000), 4 * MB, 32, {"cpu": host, "disk": disk})
    codes = np.array(run, np.int8)

    def saving(k: int) -> float:
        counts = {KINDS[c]: run[:k].count(c) for c in (0, 1)}
        return m.recompute_seconds(k) - m.load_seconds(counts)

    best = m.best_prefix(codes, KINDS)
    top = max([0.0] + [saving(k) for k in range(1, len(run) + 1)])
    assert abs((saving(best) if best else 0.0) - top) < 1e-12
    assert best == 0 or saving(best) > 0


# ---------------------------------------------------------------------------- through the manager
def prefill(bm, rid, prompt, device_ids):
    bm.match(rid, prompt, 0)
    bm.allocated(rid, device_ids)
    ops = bm.schedule([RequestData(rid, prompt, device_ids, 0, len(prompt))], [])
    bm.apply_results([OpResult(op.op_id, True) for op in ops])
    while bm.num_pending_ops:  # background host -> disk until idle
        ops = bm.schedule([], [])
        bm.apply_results([OpResult(op.op_id, True) for op in ops])
    bm.finish(rid)


def test_manager_rejects_a_slow_disk_tier_and_uses_a_fast_one(make_bm):
    prompt = list(range(4 * 10 + 1))
    for disk_gbps, expected in ((1e-6, 0), (1e6, 40)):
        s = make_settings(16, 32, cost=True, cost_model={"enabled": True, "bandwidth_gbps": {"disk": disk_gbps}})
        bm = make_bm(s)
        bm.recovered("disk", np.arange(10), block_keys(bm.namespace, prompt))  # on disk only
        m = bm.match(2, prompt, 0)
        assert m.num_tokens == expected and m.disk_blocks * 4 == expected
        bm.finish(2)


def test_manager_keeps_host_blocks_and_drops_the_slow_disk_tail(make_bm):
    prompt = list(range(4 * 12 + 1))
    for disk_gbps, expected in ((1e-6, (4, 0)), (1e6, (4, 8))):
        s = make_settings(16, 64, cost_model={"enabled": True, "bandwidth_gbps": {"disk": disk_gbps}})
        bm = make_bm(s)
        prefill(bm, 1, prompt[:17], list(range(5)))  # the first 4 blocks in the host
        keys = block_keys(bm.namespace, prompt)
        bm.recovered("disk", np.arange(12, 24), keys)  # the whole prompt on disk (found at start)
        m = bm.match(2, prompt, 0)
        assert (m.host_blocks, m.disk_blocks) == expected
        bm.finish(2)
        bm.verify()


def test_observed_slow_loads_turn_a_tier_off(make_bm):
    bm = make_bm(make_settings(16, None, cost=True))
    prompt = list(range(4 * 8 + 1))
    prefill(bm, 1, prompt, list(range(9)))
    rid = 2
    while bm.match(rid, prompt, 0).num_tokens:  # every load reports 2 KB/s: the path is broken
        assert rid < 60, "the cost model never gave up on a path slower than recompute"
        bm.allocated(rid, list(range(20, 29)))
        ops = bm.schedule([], [])
        bm.apply_results([OpResult(op.op_id, True, num_bytes=2048, seconds=1.0) for op in ops])
        bm.finish(rid)
        rid += 1
    assert rid > 3 and bm.bandwidth_gbps("cpu") < 0.01


# ------------------------------------------------------------------------------ learned prefill speed
def test_prefill_speed_is_learned_from_forward_passes_including_the_context_term():
    m = model()
    a, b = 2e-5, 1e-9  # 50k tokens/s at position 0, attention adding 1 ns per token of context
    rng = np.random.default_rng(0)
    for _ in range(40):
        n, start = int(rng.integers(256, 8192)), int(rng.integers(0, 100_000))
        position_sum = n * (start + (n - 1) / 2)
        m.observe_step(n, position_sum, 1, a * n + b * position_sum)
    assert abs(m.prefill.a - a) / a < 1e-3 and abs(m.prefill.b - b) / b < 1e-3
    # a block deep in a long context costs more to recompute than one at the start
    assert m.recompute_seconds(1, first_block=3000) > 2 * m.recompute_seconds(1, first_block=0)


def test_decode_steps_and_steps_with_loads_teach_nothing():
    m = model()
    m.observe_step(64, 64 * 5000.0, 64, 0.5)  # a decode step: 64 requests, one token each
    m.observe_step(4096, 4096 * 2048.0, 1, None)  # a step that loaded blocks: its time is not compute
    assert m.prefill.observed == 0 and m.prefill.tokens_per_s == 32_000
    off = model(learn_prefill=False)
    off.observe_step(4096, 4096 * 2048.0, 1, 10.0)
    assert off.prefill.tokens_per_s == 32_000


def test_a_saturated_engine_weighs_recompute_up_to_twice():
    s = CostModelSettings(prefill_tokens_per_s=32_000, fixed_overhead_s=0.0)
    m = CostModel(s, 4 * MB, 32, {"cpu": 50.0, "disk": 2.4}, capacity=(8192, 8))
    # disk: 1.67 ms per block against 1 ms of recompute: not worth it on an idle engine
    assert m.best_prefix(np.ones(10, np.int8), KINDS) == 0
    for _ in range(32):
        m.observe_step(8192, 8192 * 4096.0, 3, None)  # every step filled max_num_tokens
    assert m.busy_weight == 2.0
    assert m.best_prefix(np.ones(10, np.int8), KINDS) == 10  # the GPU is the bottleneck: load


def test_declined_blocks_are_counted_per_tier(make_bm):
    prompt = list(range(4 * 10 + 1))
    s = make_settings(16, 32, cost=True, cost_model={"enabled": True, "bandwidth_gbps": {"disk": 1e-6}})
    bm = make_bm(s)
    bm.recovered("disk", np.arange(10), block_keys(bm.namespace, prompt))
    assert bm.match(2, prompt, 0).num_tokens == 0
    assert bm.stats.declined_blocks == {"disk": 10}
    bm.finish(2)
