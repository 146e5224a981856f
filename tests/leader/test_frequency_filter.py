"""The ``frequency`` disk admission filter (plugins/policy_frequency) with an injected clock."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_core.errors import ConfigError
from kvbm_policy_frequency import FrequencyFilter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(i: int) -> np.ndarray:
    return np.array([[i, i * 3 + 1]], np.uint64)


def test_registered_under_its_name(registry):
    assert registry.get("filter", "frequency", "k") is FrequencyFilter


def test_frequency_starts_at_one_doubles_and_admits_at_two():
    f = FrequencyFilter(clock=Clock())
    answers = [bool(f.admit(key(1))[0]) for _ in range(4)]
    assert answers == [False, True, True, True]
    assert f.frequency(key(1)[0]) == 8


def test_threshold_is_an_option():
    f = FrequencyFilter({"min_frequency": 4}, clock=Clock())
    assert [bool(f.admit(key(1))[0]) for _ in range(3)] == [False, False, True]  # 1, 2, 4


def test_batch_answers_per_key_and_repeats_count():
    f = FrequencyFilter(clock=Clock())
    assert f.admit(np.concatenate([key(1), key(2), key(1)])).tolist() == [False, False, True]


def test_decay_is_one_per_elapsed_interval():
    clock = Clock()
    f = FrequencyFilter({"decay_interval_s": 10}, clock=clock)
    for _ in range(3):
        f.admit(key(1))  # 1, 2, 4
    assert f.frequency(key(1)[0]) == 4
    clock.now += 9.9
    assert f.frequency(key(1)[0]) == 4  # no whole interval yet
    clock.now += 0.1
    assert f.frequency(key(1)[0]) == 3
    clock.now += 20
    assert f.frequency(key(1)[0]) == 1
    clock.now += 10
    assert f.frequency(key(1)[0]) == 0 and len(f) == 0  # removed at 0
    assert not f.admit(key(1))[0]  # a fresh start at 1


def test_a_decayed_block_is_admitted_again_on_its_next_offer():
    clock = Clock()
    f = FrequencyFilter({"decay_interval_s": 60}, clock=clock)
    f.admit(key(5))
    f.admit(key(5))  # 2
    clock.now += 60  # 1
    assert f.admit(key(5))[0]  # 2 again


def test_entry_bound_runs_extra_decay_passes():
    clock = Clock()
    f = FrequencyFilter({"max_entries": 3, "decay_interval_s": 100}, clock=clock)
    for _ in range(3):
        f.admit(key(1))  # 4
    f.admit(key(2))
    f.admit(key(2))  # 2
    f.admit(key(3))  # 1
    clock.now += 50
    f.admit(key(4))  # 4 entries > 3: one pass removes the ones at 1 and restarts the interval
    assert len(f) == 2
    assert f.frequency(key(1)[0]) == 3 and f.frequency(key(2)[0]) == 1
    clock.now += 99  # the interval restarted at t+50: no tick yet
    assert f.frequency(key(1)[0]) == 3


@pytest.mark.parametrize(
    ("options", "where"),
    [
        ({"min_frequency": 0}, "min_frequency"),
        ({"max_entries": "many"}, "max_entries"),
        ({"decay_interval_s": 0}, "decay_interval_s"),
        ({"decay_interval_s": float("inf")}, "decay_interval_s"),
        ({"flush": 3}, "flush"),
    ],
)
def test_bad_options_name_the_key(options, where):
    with pytest.raises(ConfigError, match=f"disk_offload_filter.options.{where}"):
        FrequencyFilter(options, clock=Clock())


@settings(max_examples=50, deadline=None)
@given(events=st.lists(st.tuples(st.integers(0, 4), st.floats(0, 35)), max_size=40))
def test_lazy_decay_equals_a_periodic_tick(events):
    """Against a reference that ticks every interval and decrements every count by one."""
    clock = Clock()
    f = FrequencyFilter({"decay_interval_s": 10, "min_frequency": 2}, clock=clock)
    ref: dict[int, int] = {}
    start = clock.now
    ticks_done = 0
    for k, dt in events:
        clock.now += dt
        due = int((clock.now - start) // 10)
        for _ in range(due - ticks_done):
            ref = {kk: c - 1 for kk, c in ref.items() if c > 1}
        ticks_done = due
        ref[k] = 1 if k not in ref else ref[k] * 2
        assert bool(f.admit(key(k))[0]) == (ref[k] >= 2)
        assert {i: f.frequency(key(i)[0]) for i in range(5)} == {i: ref.get(i, 0) for i in range(5)}
