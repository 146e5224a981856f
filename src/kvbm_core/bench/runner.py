"""Runs the workload twice on the reference executor: the baseline (no connector), then with kvbm.

Both runs share one :class:`~kvbm_core.testing.ReferenceModel` (the same weights, built once), one
engine configuration and one workload (same seed, same tokens, same schedule). Each run builds its
executor, serves a warm-up (one user, two rounds of the same lengths, from a separate token stream,
like LMBenchmark's) so that one-time costs stay out of the measured TTFT, then the measured workload.
kvbm's counters are read from its event hooks, reset after the warm-up (:mod:`.collector`), and from
the leader's ``stats``, once the workers have drained every operation still in flight (background
host -> disk writes included). The kvbm run's ``DYN_KVBM_*`` variables are set in the environment for its
duration only (:mod:`.environment`); its connector is closed before they are restored.

Device-agnostic: with ``device="cuda"`` the model, the pool and kvbm's transfers are on the GPU.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm import tqdm

from kvbm_core.bench.collector import TransferCollector, TransferTotals, collector_for
from kvbm_core.bench.environment import KvbmEnvironment, kvbm_environment
from kvbm_core.bench.presets import BenchConfig
from kvbm_core.bench.sessions import SessionDriver
from kvbm_core.bench.workload import MultiRoundQA
from kvbm_core.errors import ConfigError
from kvbm_core.leader import LeaderStats
from kvbm_core.registry import default_registry
from kvbm_core.testing import ExecutorConfig, ReferenceExecutor, ReferenceModel, RunCounters
from kvbm_core.trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker

WARMUP_NAMESPACE = 1


@dataclass(frozen=True)
class RequestRecord:
    """One measured request. Times are seconds since its run started."""

    user: int
    round: int
    prompt_tokens: int
    arrival_s: float
    first_token_s: float | None
    finish_s: float
    tokens: tuple[int, ...]
    device_reused_tokens: int
    connector_tokens: int

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s


@dataclass(frozen=True)
class KvbmRecord:
    transfers: TransferTotals  # measured run only (reset after the warm-up)
    stats: LeaderStats | None  # the leader's accounting since it was built (warm-up included)
    environment: KvbmEnvironment


@dataclass(frozen=True)
class RunRecord:
    name: str
    requests: tuple[RequestRecord, ...]
    run_s: float  # the executor's run, until every save was reported
    warmup_s: float
    counters: RunCounters
    kvbm: KvbmRecord | None = None


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    executor: ExecutorConfig
    baseline: RunRecord
    kvbm: RunRecord
    device_name: str


def run_bench(config: BenchConfig, progress: bool = True) -> BenchResult:
    """Both runs, baseline first. Raises :class:`ConfigError` for an unusable device or settings."""
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device", f"{config.device}: no CUDA device is visible to torch", ["cpu"])
    executor_config = config.executor_config()
    threads = torch.get_num_threads()
    if config.device == "cpu":
        torch.set_num_threads(config.threads or 1)
    elif config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        model = ReferenceModel(config.model, seed=config.seed, device=config.device,
                               max_seq_len=executor_config.max_seq_len, mode=config.model_mode)
        baseline = _measure("baseline", config, executor_config, model, None, progress)
        _release_memory(config.device)  # the baseline's pool
        registry = default_registry()
        with kvbm_environment(registry, config.profile, config.preset, config.preset_profile,
                              config.preset_variables) as env:
            kvbm = _measure("kvbm", config, executor_config, model, (env, collector_for(registry)), progress)
    finally:
        torch.set_num_threads(threads)
    return BenchResult(config, executor_config, baseline, kvbm, device_name(config.device))


def _measure(
    name: str,
    config: BenchConfig,
    executor_config: ExecutorConfig,
    model: ReferenceModel,
    kvbm: tuple[KvbmEnvironment, TransferCollector] | None,
    progress: bool,
) -> RunRecord:
    connector = None if kvbm is None else (KvbmConnectorLeader, KvbmConnectorWorker)
    executor = ReferenceExecutor(executor_config, connector=connector, model=model)
    try:
        workload = config.workload()
        warmup_s = 0.0
        if config.warmup:
            warm = replace(workload, users=1, rounds=min(2, workload.rounds), qps=float("inf"), ramp_up_s=0.0)
            driver = SessionDriver(MultiRoundQA(warm, namespace=WARMUP_NAMESPACE))
            warmup_s = executor.run(driver.initial_specs(), driver.on_finish).wall_s
        if kvbm is not None:
            kvbm[1].reset()
        bar = tqdm(total=workload.num_requests, desc=f"{name:>8}", unit="req", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        with bar:
            driver = SessionDriver(MultiRoundQA(workload), on_request_done=lambda: bar.update(1))
            result = executor.run(driver.initial_specs(), driver.on_finish)
        requests = tuple(
            RequestRecord(
                user=turn.user,
                round=turn.round,
                prompt_tokens=r.prompt_len,
                arrival_s=r.arrival_s,
                first_token_s=r.first_token_s,
                finish_s=r.finish_s,
                tokens=r.tokens,
                device_reused_tokens=r.device_reused_tokens,
                connector_tokens=r.connector_tokens,
            )
            for turn, r in zip(driver.turns, result.requests, strict=True)
        )
        record = None
        if kvbm is not None:
            for worker in executor.workers:
                worker.close()  # drains the operations still in flight (background host -> disk)
            stats = executor.scheduler.stats  # applies their results: their events reach the collector
            record = KvbmRecord(kvbm[1].totals(), stats, kvbm[0])
        return RunRecord(name, requests, result.wall_s, warmup_s, result.counters, record)
    finally:
        _close(executor)


def _close(executor: ReferenceExecutor) -> None:
    """Drain and release kvbm's tiers, before the environment (and its disk directory) goes."""
    for worker in executor.workers:
        worker.close()
    if executor.scheduler is not None:
        executor.scheduler.close()


def _release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    """The accelerator's name, or the CPU's model name."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, name: str) -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "device": device,
        "device_name": name,
    }

