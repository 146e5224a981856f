"""The bench's figures from per-request records: TTFT statistics, span throughput, ratios, outputs check."""

from __future__ import annotations

import pytest

from kvbm_core.bench.runner import RequestRecord, RunRecord
from kvbm_core.bench.summary import compare_outputs, mean_ttft_by_round, ratios, summarize, ttft_stats
from kvbm_core.testing import RunCounters

COUNTERS = RunCounters(*([0] * 15))


def record(user: int, rnd: int, arrival: float, ttft: float, tokens: tuple[int, ...]) -> RequestRecord:
    return RequestRecord(user, rnd, 100, arrival, arrival + ttft, arrival + ttft + 0.5, tokens, 0, 0)


def run(name: str, ttfts: list[float], tokens: list[tuple[int, ...]]) -> RunRecord:
    reqs = tuple(record(i % 2, i // 2, float(i), t, tok) for i, (t, tok) in enumerate(zip(ttfts, tokens)))
    return RunRecord(name, reqs, run_s=10.0, warmup_s=0.0, counters=COUNTERS)


def test_ttft_percentiles_interpolate_linearly():
    s = ttft_stats([float(x) for x in range(1, 101)])
    assert (s.mean_s, s.p50_s, s.p90_s, s.p99_s) == pytest.approx((50.5, 50.5, 90.1, 99.01))


def test_summary_span_throughput_and_ratios():
    base = run("baseline", [0.4, 0.4, 0.4, 0.4], [(1, 2)] * 4)
    fast = run("kvbm", [0.1, 0.1, 0.1, 0.1], [(1, 2)] * 4)
    b, k = summarize(base), summarize(fast)
    assert b.span_s == pytest.approx(3 + 0.4 + 0.5) and k.span_s == pytest.approx(3 + 0.1 + 0.5)
    assert b.input_tokens == 400 and b.output_tokens == 8
    assert b.output_tokens_per_s == pytest.approx(8 / 3.9)
    q = ratios(b, k)
    assert q.ttft_speedup_mean == pytest.approx(4.0) and q.ttft_speedup_p99 == pytest.approx(4.0)
    assert q.output_throughput == pytest.approx(3.9 / 3.6)
    assert mean_ttft_by_round(base) == pytest.approx({0: 0.4, 1: 0.4})


def test_outputs_are_compared_by_user_and_round_with_the_first_differing_position():
    base = run("baseline", [0.1] * 4, [(1, 2, 3), (4, 5, 6), (7, 8, 9), (1, 1, 1)])
    same = run("kvbm", [0.1] * 4, [(1, 2, 3), (4, 5, 6), (7, 8, 9), (1, 1, 1)])
    assert compare_outputs(base, same).identical and compare_outputs(base, same).compared == 4
    other = run("kvbm", [0.1] * 4, [(1, 2, 3), (4, 0, 6), (7, 8, 9), (1, 1)])
    check = compare_outputs(base, other)
    assert not check.identical
    assert [(d.user, d.round, d.position) for d in check.differences] == [(1, 0, 1), (1, 1, 2)]
    shorter = RunRecord("kvbm", other.requests[:3], 1.0, 0.0, COUNTERS)
    missing = compare_outputs(base, shorter)
    assert [(d.user, d.round, d.position) for d in missing.differences] == [(1, 0, 1), (1, 1, None)]
