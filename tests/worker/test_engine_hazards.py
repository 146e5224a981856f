"""Operations on overlapping slots, submitted at once, behave as if run one by one in order.

A sequential model tracks which content each host and disk slot holds after every operation; the
engine runs the same operations concurrently (stores and background disk writes in flight together,
on several threads, loads and staging reads issued on top of them). Every load must deliver exactly
the content the model says its slot held at that point, and the slots must end as the model ends. A
store overwriting a slot that an earlier load or disk write is still reading would show up as wrong
bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbm_core.interfaces import TierLevel
from kvbm_core.ops import Route
from kvbm_core.worker.hazards import SlotHazards

from enginekit import keys_for, make_rig, random_rows

HOST_SLOTS, DISK_SLOTS, SOURCES = 4, 4, 6

ROUTES = ["d2h", "d2disk", "h2d", "h2disk", "disk2h"]
op_strategy = st.tuples(
    st.sampled_from(ROUTES),
    st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),  # tier slots touched
    st.lists(st.integers(0, 3), min_size=3, max_size=3, unique=True),  # the other tier's slots
    st.integers(0, SOURCES - 1),
)


def _simulate_and_run(tmp_path: Path, program: list, io_threads: int) -> None:
    rig = make_rig(tmp_path, host_slots=HOST_SLOTS, disk_slots=DISK_SLOTS, device_blocks=SOURCES + 3 * len(program) + 8,
                   io_threads=io_threads)
    content = random_rows(SOURCES, seed=11)
    rig.pool[:SOURCES] = content
    host: list[int | None] = [None] * HOST_SLOTS
    disk: list[int | None] = [None] * DISK_SLOTS
    next_target = SOURCES
    expected_loads: dict[int, tuple[np.ndarray, list]] = {}  # op id -> (device blocks, content ids)
    submitted = 0
    for op_id, (route, slots, others, src) in enumerate(program):
        slots = np.array(slots)
        sources = (src + np.arange(len(slots))) % SOURCES
        if route in ("d2h", "d2disk"):
            rig.run(op_id, [(op_id, _r(route.upper()), op_id, sources, slots, keys_for(sources))])
            for s, c in zip(slots, sources):
                (host if route == "d2h" else disk)[s] = int(c)
        elif route in ("h2disk", "disk2h"):
            source, target = (host, disk) if route == "h2disk" else (disk, host)
            slots = np.array([s for s in slots if source[s] is not None])
            if not len(slots):
                continue
            dst = np.array(others[: len(slots)])
            held = [source[s] for s in slots]
            if route == "h2disk":
                rig.run(op_id, [(op_id, _r("H2DISK"), op_id, slots, dst, keys_for(np.array(held)))])
            else:  # staged at once, on top of whatever is still in flight
                assert rig.stage(op_id, slots, dst, keys_for(np.array(held))).ok
            for d, c in zip(dst, held):
                target[d] = c
        else:
            slots = np.array([s for s in slots if host[s] is not None])
            if not len(slots):
                continue
            held = [host[s] for s in slots]
            targets = np.arange(next_target, next_target + len(slots))  # fresh, zero device blocks
            next_target += len(slots)
            assert not rig.run(op_id, [(op_id, _r("H2D"), op_id, slots, targets, keys_for(np.array(held)))])
            expected_loads[op_id] = (targets, held)
        if route != "disk2h":
            submitted += 1
    results = rig.engine.drain(60)
    assert len(results) == submitted and all(r.ok for r in results), [r for r in results if not r.ok]
    for targets, held in expected_loads.values():
        assert torch.equal(rig.pool[targets], content[held])
    host_pool = rig.tiers[TierLevel.HOST].slots
    for s, c in enumerate(host):
        if c is not None:
            assert torch.equal(host_pool[s], content[c]), f"host slot {s}"
    for s, c in enumerate(disk):  # what every disk slot holds, staged back into host slot 0
        if c is not None:
            assert rig.stage(10_000 + s, [s], [0], keys_for(np.array([c]))).ok
            assert torch.equal(host_pool[0], content[c]), f"disk slot {s}"
    rig.close()


def _r(name: str) -> Route:
    return Route[name]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=st.lists(op_strategy, min_size=1, max_size=14))
def test_concurrent_operations_match_the_sequential_model(tmp_path_factory, program) -> None:
    _simulate_and_run(tmp_path_factory.mktemp("hz"), program, io_threads=4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_long_random_programs_with_many_threads(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    program = [
        (ROUTES[rng.integers(len(ROUTES))], list(rng.choice(4, size=rng.integers(1, 4), replace=False)),
         list(rng.choice(4, size=3, replace=False)), int(rng.integers(SOURCES)))
        for _ in range(150)
    ]
    _simulate_and_run(tmp_path, program, io_threads=8)


def test_hazard_dependencies() -> None:
    hz = SlotHazards(6)
    slots = np.array([1, 2])
    assert hz.write(slots, 10).tolist() == []
    assert hz.read(slots, 11, stream=True).tolist() == [10]  # read after write
    assert hz.read(np.array([2, 3]), 12, stream=False).tolist() == [10]
    assert hz.read(np.array([2]), 13, stream=False).tolist() == [10, 12]  # host reads of a slot chain
    assert hz.write(np.array([2, 5]), 14).tolist() == [10, 11, 13]  # after the last write and every read
    assert hz.read(np.array([1]), 15, stream=True).tolist() == [10]
    hz.written(np.array([2, 5]), np.array([False, True]))
    assert hz.bad(np.array([5, 2, 1])).tolist() == [1]
    hz.written(np.array([2]), np.array([True]))
    assert hz.bad(np.array([2])).tolist() == []
