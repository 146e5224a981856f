"""The transfer engine on a CPU pool: every route, byte for byte, and how failures are reported."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_core.interfaces import TierLevel
from kvbm_core.ops import Route, StepOps
from kvbm_core.worker.copies import coalesce

from enginekit import BPB, keys_for, make_rig, random_rows


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=30),
       src_segment=st.sampled_from([0, 1, 4, 7]), dst_segment=st.sampled_from([0, 1, 5]),
       max_len=st.sampled_from([0, 1, 3]))
def test_coalesce_covers_every_pair_in_maximal_legal_runs(pairs, src_segment, dst_segment, max_len) -> None:
    src = np.array([p[0] for p in pairs], dtype=np.int64)
    dst = np.array([p[1] for p in pairs], dtype=np.int64)
    s0, d0, n = coalesce(src, dst, src_segment, dst_segment, max_len)
    rebuilt_src = np.concatenate([np.arange(s, s + k) for s, k in zip(s0, n)]) if len(n) else np.zeros(0)
    rebuilt_dst = np.concatenate([np.arange(d, d + k) for d, k in zip(d0, n)]) if len(n) else np.zeros(0)
    assert rebuilt_src.tolist() == src.tolist() and rebuilt_dst.tolist() == dst.tolist()
    for s, d, k in zip(s0, d0, n):
        assert k >= 1 and (not max_len or k <= max_len)
        if src_segment:
            assert s // src_segment == (s + k - 1) // src_segment
        if dst_segment:
            assert d // dst_segment == (d + k - 1) // dst_segment
    if not (src_segment or dst_segment or max_len):
        ends_s, ends_d = s0 + n, d0 + n  # maximal: no run continues where the previous one ended
        assert not np.any((ends_s[:-1] == s0[1:]) & (ends_d[:-1] == d0[1:]))


def test_every_route_round_trips_random_blocks(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, host_slots=64)
    rng = np.random.default_rng(3)
    src_blocks = rng.permutation(32)[:24]  # scattered device blocks
    rig.pool[src_blocks] = random_rows(24, seed=1)
    original = rig.pool.clone()
    host_slots = np.concatenate([np.arange(4, 14), rng.permutation(np.arange(14, 32))[:14]])  # a run, then scattered
    disk_slots = np.concatenate([rng.permutation(np.r_[0:12, 24:32])[:12], np.arange(12, 24)])  # scattered, then a run
    keys = keys_for(np.arange(24))
    rig.run(0, [(1, Route.D2H, 1, src_blocks[:12], host_slots[:12], keys[:12]),
                (5, Route.D2DISK, 1, src_blocks[12:], disk_slots[12:], keys[12:])])
    rig.run(1, [(2, Route.H2DISK, 1, host_slots[:12], disk_slots[:12], keys[:12])])
    rig.run(2, [(6, Route.D2H, 1, src_blocks[12:], host_slots[12:], keys[12:])])
    results = {r.op_id: r for r in rig.engine.drain(30)}
    assert all(r.ok for r in results.values()), results
    assert results[1].num_bytes == results[2].num_bytes == results[5].num_bytes == 12 * BPB
    assert all(r.seconds >= 0 for r in results.values()) and results[2].seconds > 0
    host = rig.tiers[TierLevel.HOST].slots
    assert torch.equal(host[host_slots], original[src_blocks])  # D2H

    staged_into = np.r_[0:4, 32:52]  # other host slots, partly scattered over two runs
    staged = rig.stage(3, disk_slots, staged_into, keys)
    assert staged.ok and staged.num_bytes == 24 * BPB
    assert torch.equal(host[staged_into], original[src_blocks])  # H2DISK or D2DISK, then DISK2H
    targets = np.r_[np.arange(44, 64), np.array([0, 1, 2, 3])]
    assert not rig.run(2, [(4, Route.H2D, 3, staged_into, targets, keys)])
    assert torch.equal(rig.pool[targets], original[src_blocks])  # H2D, complete when start_loads returned
    assert [r.op_id for r in rig.engine.drain(30)] == [4]  # the staging result went to its caller only
    rig.close()


def test_results_are_reported_once_and_pending_follows_requests(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.pool[:4] = random_rows(4, seed=6)
    rig.run(0, [(1, Route.D2H, 77, np.arange(4), np.arange(4), keys_for(np.arange(4)))])
    results = rig.engine.drain(30)
    assert [r.op_id for r in results] == [1] and results[0].ok and results[0].request_id == 77
    assert not rig.engine.pending(77) and not rig.engine.pending(78)
    assert rig.engine.poll() == []
    rig.close()


def test_bad_operations_fail_without_stopping_the_engine(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, kinds=("cpu",), host_slots=8)
    keys = keys_for(np.arange(2))
    rig.run(0, [(1, Route.D2H, 1, np.array([0, 1]), np.array([7, 8]), keys),  # host slot 8 does not exist
                (2, Route.H2DISK, 1, np.array([0, 1]), np.array([0, 1]), keys)])  # no disk tier on this rank
    results = {r.op_id: r for r in rig.engine.drain(10)}
    assert not results[1].ok and "out of range" in results[1].error and results[1].failed_blocks == (0, 1)
    assert not results[2].ok and "needs a disk tier" in results[2].error
    with pytest.raises(ValueError, match="route"):
        rig.engine.start_loads(StepOps.build(0, [(3, Route.D2H, 1, [0], [0], keys[:1])]).select({Route.D2H}), None)
    rig.run(1, [(4, Route.D2H, 1, np.array([0]), np.array([0]), keys[:1])])
    assert rig.engine.drain(10)[0].ok  # still serving
    rig.close()


def test_a_load_from_a_slot_whose_write_failed_is_reported_at_once(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, kinds=("cpu",), host_slots=8)
    keys = keys_for(np.arange(2))
    rig.engine._host_hz.written(np.array([3]), np.array([False]))  # as a failed store leaves it
    failed = rig.run(0, [(1, Route.H2D, 42, np.array([2, 3]), np.array([0, 1]), keys)])
    assert list(failed) == [42] and "last write failed" in failed[42]
    rig.close()


def test_flipped_bit_on_disk_fails_exactly_that_block_and_never_reaches_the_host(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.pool[:6] = random_rows(6, seed=8)
    original = rig.pool.clone()
    keys = keys_for(np.arange(6))
    rig.run(0, [(1, Route.D2H, 1, np.arange(6), np.arange(6), keys)])
    rig.run(1, [(2, Route.H2DISK, 1, np.arange(6), np.arange(10, 16), keys)])
    assert all(r.ok for r in rig.engine.drain(30))
    disk = rig.tiers[TierLevel.DISK]
    with open(disk.path, "r+b") as f:
        offset = disk.format.offset(13) + 4096 + 1234
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0x04]))
    host = rig.tiers[TierLevel.HOST].slots
    host[20:26] = 0xEE  # sentinel: a failed block must leave its host slot untouched
    result = rig.stage(3, np.arange(10, 16), np.arange(20, 26), keys)
    assert not result.ok and result.failed_blocks == (3,) and "checksum" in result.error
    assert result.num_bytes == 5 * BPB
    good = [0, 1, 2, 4, 5]
    assert torch.equal(host[20 + np.array(good)], original[good])
    assert bool((host[23] == 0xEE).all())
    rig.close()


def test_staging_a_slot_never_written_fails(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    result = rig.stage(1, np.array([3]), np.array([0]), keys_for(np.array([9])))
    assert not result.ok and result.failed_blocks == (0,) and "no intact committed record" in result.error
    rig.close()


def test_engine_writes_to_a_block_wait_for_the_store_still_reading_it(tmp_path: Path) -> None:
    """kvbm frees a finished request's device blocks at once; before the engine writes a block it
    handed out again, ``order_engine_writes`` holds it back until this rank's store of it copied."""
    rig = make_rig(tmp_path)
    disk, host = rig.tiers[TierLevel.DISK], rig.tiers[TierLevel.HOST].slots
    gate = threading.Event()
    write_rows = disk.write_rows
    disk.write_rows = lambda *args: (gate.wait(30), write_rows(*args))[1]  # a slow disk
    rig.pool[5] = random_rows(1, seed=21)[0]
    stored = rig.pool[5].clone()
    rig.run(0, [(1, Route.D2H, 1, np.array([9]), np.array([0]), keys_for(np.array([9])))])
    assert rig.engine.drain(10)[0].ok
    rig.run(1, [(2, Route.H2DISK, 1, np.array([0]), np.array([0]), keys_for(np.array([9])))])  # reads host slot 0
    rig.run(2, [(3, Route.D2H, 2, np.array([5]), np.array([0]), keys_for(np.array([5])))])  # waits for it
    threading.Timer(0.3, gate.set).start()
    rig.engine.order_engine_writes(np.array([5]), None)
    rig.pool[5] = 0xAB  # the engine's next forward pass writes the block
    assert all(r.ok for r in rig.engine.drain(30))
    assert torch.equal(host[0], stored)  # the store copied the block as it was, not the new bytes
    rig.close()
