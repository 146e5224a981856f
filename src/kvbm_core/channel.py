"""The in-process rendezvous between the leader and the worker that shares its process.

TRT-LLM builds the scheduler-side connector on rank 0 only, in the same process as rank 0's
worker, and hands both the same ``llm_args`` object. That object keys a :class:`LocalChannel`:

- worker -> leader: the pool layout (``register_kv_caches``), operation results, how much of its
  host tier is usable yet (:class:`~kvbm_core.ops.TierReady`), how long its forward passes took
  (:class:`~kvbm_core.ops.StepTiming`, rank 0 only), blocks a disk tier found at start (restart
  safety);
- leader -> worker: the :class:`WorkerConfig` (resolved settings and tier sizes).

Workers of other ranks (other processes) have no leader here: they take the :class:`WorkerConfig`
from the first step's metadata and reach the leader over :mod:`kvbm_core.link`, whose address
travels in that configuration. Every rank's results reach the leader; each worker also orders
operations on a slot locally, so a lagging rank never sees a slot reused under it.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import numpy as np

from kvbm_core.layout import BlockLayout
from kvbm_core.ops import Op, OpResult, StepTiming, TierReady, WorkerConfig


class LeaderEndpoint(Protocol):
    """What the leader offers to the workers of its process."""

    def on_worker_layout(self, rank: int, layout: BlockLayout, num_device_blocks: int) -> WorkerConfig: ...

    def on_recovered(self, kind: str, slots: np.ndarray, keys: np.ndarray) -> None: ...


class WorkerEndpoint(Protocol):
    """What the worker in the leader's process offers to the leader."""

    def collect_results(self) -> None:
        """Hand the operations that finished so far to :meth:`LocalChannel.report`."""

    def stage(self, op: Op, timeout: float) -> OpResult:
        """Run a staging operation now and return its result."""


class LocalChannel:
    """One engine instance's in-process link. Results are queued; the leader drains them.

    The leader calls the worker of its process (``worker``) to collect results before it decides
    anything, so copies that completed while the engine idled count at once, and to stage blocks.
    """

    def __init__(self) -> None:
        self.leader: LeaderEndpoint | None = None
        self.worker: WorkerEndpoint | None = None
        self._lock = threading.Lock()
        self._results: list[OpResult] = []
        self._ready: list[TierReady] = []
        self._timings: list[StepTiming] = []

    def collect(self) -> None:
        worker = self.worker
        if worker is not None:
            worker.collect_results()

    def report(self, results: list[OpResult]) -> None:
        """Called by rank 0's worker, or the link for other ranks, from any thread."""
        if results:
            with self._lock:
                self._results.extend(results)

    def drain(self) -> list[OpResult]:
        """Called by the leader on its scheduling thread."""
        with self._lock:
            out, self._results = self._results, []
        return out

    def report_ready(self, ready: TierReady) -> None:
        """Called by any rank's worker (through the link for other ranks), from any thread."""
        with self._lock:
            self._ready.append(ready)

    def drain_ready(self) -> list[TierReady]:
        with self._lock:
            out, self._ready = self._ready, []
        return out

    def report_timing(self, timing: StepTiming) -> None:
        with self._lock:
            self._timings.append(timing)

    def drain_timings(self) -> list[StepTiming]:
        with self._lock:
            out, self._timings = self._timings, []
        return out


_channels: dict[int, tuple[Any, LocalChannel]] = {}
_channels_lock = threading.Lock()


def channel_for(llm_args: Any) -> LocalChannel:
    """The channel of the engine instance that ``llm_args`` belongs to (keyed by object identity).

    The ``llm_args`` object is kept alive alongside its channel so that its id is never reused.
    """
    with _channels_lock:
        entry = _channels.get(id(llm_args))
        if entry is None or entry[0] is not llm_args:
            entry = _channels[id(llm_args)] = (llm_args, LocalChannel())
        return entry[1]


def release_channel(llm_args: Any) -> None:
    with _channels_lock:
        entry = _channels.get(id(llm_args))
        if entry is not None and entry[0] is llm_args:
            del _channels[id(llm_args)]
