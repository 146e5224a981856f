"""Operations on overlapping slots, submitted at once, behave as if run one by one in order.

A sequential model tracks which content each host and disk slot holds after every operation; the
engine runs the same operations concurrently (stores, background writes, non-blocking loads, all in
flight together, on several threads). Every load must deliver exactly the content the model says
its slot held at that point, and the slots must end as the model ends. A store overwriting a slot
that an earlier load or disk write is still reading would show up as wrong bytes.
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

op_strategy = st.tuples(
    st.sampled_from(["d2h", "h2d", "h2disk", "disk2d", "d2disk"]),
    st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),  # tier slots touched
    st.lists(st.integers(0, 3), min_size=3, max_size=3, unique=True),  # the other side's slots (h2disk)
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
        if route == "d2h":
            rig.run(op_id, [(op_id, _r("D2H"), op_id, sources, slots, keys_for(sources))])
            for s, c in zip(slots, sources):
                host[s] = int(c)
        elif route == "d2disk":
            rig.run(op_id, [(op_id, _r("D2DISK"), op_id, sources, slots, keys_for(sources))])
            for s, c in zip(slots, sources):
                disk[s] = int(c)
        elif route == "h2disk":
            slots = np.array([s for s in slots if host[s] is not None])
            if not len(slots):
                continue
            dst = np.array(others[: len(slots)])
            held = [host[s] for s in slots]
            rig.run(op_id, [(op_id, _r("H2DISK"), op_id, slots, dst, keys_for(np.array(held)))])
            for d, c in zip(dst, held):
                disk[d] = c
        else:
            table = host if route == "h2d" else disk
            slots = np.array([s for s in slots if table[s] is not None])
            if not len(slots):
                continue
            held = [table[s] for s in slots]
            targets = np.arange(next_target, next_target + len(slots))  # fresh, zero device blocks
            next_target += len(slots)
            rig.run(op_id, [(op_id, _r("H2D" if route == "h2d" else "DISK2D"), op_id, slots, targets,
                             keys_for(np.array(held)))], blocking=False)
            expected_loads[op_id] = (targets, held)
        submitted += 1
    results = rig.engine.drain(60)
    assert len(results) == submitted and all(r.ok for r in results), [r for r in results if not r.ok]
    for targets, held in expected_loads.values():
        assert torch.equal(rig.pool[targets], content[held])
    host_pool = rig.tiers[TierLevel.HOST].slots
    for s, c in enumerate(host):
        if c is not None:
            assert torch.equal(host_pool[s], content[c]), f"host slot {s}"
    final = [(s, c) for s, c in enumerate(disk) if c is not None]
    if final:
        targets = np.arange(next_target, next_target + len(final))
        rig.run(999, [(999, _r("DISK2D"), 0, np.array([s for s, _ in final]), targets,
                       keys_for(np.array([c for _, c in final])))], blocking=True)
        assert all(r.ok for r in rig.engine.drain(30))
        assert torch.equal(rig.pool[targets], content[[c for _, c in final]])
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
    routes = ["d2h", "h2d", "h2disk", "disk2d", "d2disk"]
    program = [
        (routes[rng.integers(5)], list(rng.choice(4, size=rng.integers(1, 4), replace=False)),
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
