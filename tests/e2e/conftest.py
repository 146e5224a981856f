"""End-to-end fixtures: kvbm's connector on the reference executor, against the no-connector baseline.

``kvbm_run`` builds a profile in a temporary directory, points ``DYN_KVBM_*`` at it exactly as a
user would, runs the workload once without and once with kvbm (same model weights), and returns
both results plus the leader's stats. Every run uses the KV oracle: each device-reused or onboarded
prefix is compared, layer by layer, with recomputation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from engine_runs import CONNECTOR, Comparison, close_connector, executor_config, settle, write_profile
from kvbm_core.testing import ExecutorConfig, ReferenceExecutor, RequestSpec, RunResult

@pytest.fixture
def kvbm_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Comparison]:
    """``kvbm_run(specs, tiers=[...], config=ExecutorConfig, env={...}, connector=(leader, worker))``
    -> :class:`Comparison`."""
    opened: list[ReferenceExecutor] = []

    def run(specs: list[RequestSpec], tiers: Sequence[dict], config: ExecutorConfig | None = None,
            env: dict[str, str] | None = None, baseline: RunResult | None = None, model: Any = None,
            connector: tuple[type, type] = CONNECTOR) -> Comparison:
        config = config or executor_config()
        profile = write_profile(tmp_path / "profile.yaml", tiers)
        monkeypatch.setenv("DYN_KVBM_PROFILE", str(profile))
        monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(tmp_path))
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        if baseline is None:
            reference = ReferenceExecutor(config, model=model)
            baseline = reference.run(specs)
            model = reference.model
        executor = ReferenceExecutor(config, connector=connector, model=model)
        opened.append(executor)
        result = executor.run(specs)
        settle(executor)
        return Comparison(baseline, result, executor.scheduler.stats, executor)

    yield run
    for executor in opened:
        close_connector(executor)
