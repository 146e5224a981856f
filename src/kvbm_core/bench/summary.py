"""The figures of one bench: TTFT statistics and throughput per run, the ratios, and the outputs check.

- TTFT: from a request's send time (its scheduled arrival) to its first generated token; mean and
  the 50th/90th/99th percentiles (linear interpolation).
- Throughput: prompt and generated tokens per second over the run's span, from the first send to
  the last finish. With paced arrivals the span follows the schedule unless the engine falls
  behind, so the ratio shows a difference only when the engine is saturated (the ``no-reuse``
  preset offers everything at once for that reason).
- Ratios: TTFT speedup = baseline / kvbm (above 1: kvbm is faster); throughput ratio = kvbm /
  baseline (below 1: kvbm costs throughput).
- Outputs: every ``(user, round)`` must have generated the same tokens in both runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvbm_core.bench.runner import RunRecord

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class TtftStats:
    mean_s: float
    p50_s: float
    p90_s: float
    p99_s: float


@dataclass(frozen=True)
class RunSummary:
    requests: int
    ttft: TtftStats
    input_tokens: int
    output_tokens: int
    span_s: float
    device_reused_tokens: int
    connector_tokens: int

    @property
    def input_tokens_per_s(self) -> float:
        return self.input_tokens / self.span_s if self.span_s > 0 else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.span_s if self.span_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.span_s if self.span_s > 0 else 0.0


@dataclass(frozen=True)
class Difference:
    """The first position at which a request's outputs differ (or ``None`` if one run lacks it)."""

    user: int
    round: int
    position: int | None


@dataclass(frozen=True)
class OutputCheck:
    compared: int
    differences: tuple[Difference, ...]

    @property
    def identical(self) -> bool:
        return not self.differences


@dataclass(frozen=True)
class Ratios:
    ttft_speedup_mean: float | None
    ttft_speedup_p50: float | None
    ttft_speedup_p90: float | None
    ttft_speedup_p99: float | None
    input_throughput: float | None
    output_throughput: float | None


def ttft_stats(values: Sequence[float]) -> TtftStats:
    a = np.asarray(values, dtype=np.float64)
    if not len(a):
        nan = float("nan")
        return TtftStats(nan, nan, nan, nan)
    p50, p90, p99 = (float(x) for x in np.percentile(a, PERCENTILES))
    return TtftStats(float(a.mean()), p50, p90, p99)


def ttfts(run: RunRecord) -> list[float]:
    return [r.ttft_s for r in run.requests if r.ttft_s is not None]


def summarize(run: RunRecord) -> RunSummary:
    reqs = run.requests
    span = max(r.finish_s for r in reqs) - min(r.arrival_s for r in reqs) if reqs else 0.0
    return RunSummary(
        requests=len(reqs),
        ttft=ttft_stats(ttfts(run)),
        input_tokens=sum(r.prompt_tokens for r in reqs),
        output_tokens=sum(len(r.tokens) for r in reqs),
        span_s=span,
        device_reused_tokens=sum(r.device_reused_tokens for r in reqs),
        connector_tokens=sum(r.connector_tokens for r in reqs),
    )


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 and np.isfinite(num) and np.isfinite(den) else None


def ratios(baseline: RunSummary, kvbm: RunSummary) -> Ratios:
    b, k = baseline.ttft, kvbm.ttft
    return Ratios(
        ttft_speedup_mean=_ratio(b.mean_s, k.mean_s),
        ttft_speedup_p50=_ratio(b.p50_s, k.p50_s),
        ttft_speedup_p90=_ratio(b.p90_s, k.p90_s),
        ttft_speedup_p99=_ratio(b.p99_s, k.p99_s),
        input_throughput=_ratio(kvbm.input_tokens_per_s, baseline.input_tokens_per_s),
        output_throughput=_ratio(kvbm.output_tokens_per_s, baseline.output_tokens_per_s),
    )


def compare_outputs(baseline: RunRecord, kvbm: RunRecord) -> OutputCheck:
    """Generated tokens of both runs, request by request, matched by ``(user, round)``."""
    a = {(r.user, r.round): r.tokens for r in baseline.requests}
    b = {(r.user, r.round): r.tokens for r in kvbm.requests}
    differences = []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if x == y:
            continue
        position = None
        if x is not None and y is not None:
            position = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        differences.append(Difference(key[0], key[1], position))
    return OutputCheck(len(a.keys() & b.keys()), tuple(differences))


def mean_ttft_by_round(run: RunRecord) -> dict[int, float]:
    by_round: dict[int, list[float]] = {}
    for r in run.requests:
        if r.ttft_s is not None:
            by_round.setdefault(r.round, []).append(r.ttft_s)
    return {k: float(np.mean(v)) for k, v in sorted(by_round.items())}


def first_differences(check: OutputCheck, limit: int = 5) -> str:
    shown = ", ".join(
        f"user {d.user} round {d.round} " + ("missing in one run" if d.position is None else f"token {d.position}")
        for d in check.differences[:limit]
    )
    more = len(check.differences) - limit
    return shown + (f" and {more} more" if more > 0 else "")

