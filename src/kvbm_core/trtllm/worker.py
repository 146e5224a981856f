"""The worker side of kvbm's connector (every rank): executes the leader's operations on the rank's KV
pool through the :class:`~kvbm_core.worker.TransferEngine`, and reports their results, how much of
its host tier is usable and (rank 0) how long its forward passes take (see
:mod:`kvbm_core.trtllm.connector` for the choices behind it)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Union

import structlog
import torch

from kvbm_core.channel import channel_for
from kvbm_core.errors import KvbmLoadError
from kvbm_core.interfaces import StorageTier, TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.link import WorkerLink
from kvbm_core.ops import BACKGROUND, LOADS, STORES, Op, OpResult, StepOps, StepTiming, TierReady, WorkerConfig
from kvbm_core.registry import default_registry
from kvbm_core.storage import BlockFileStorage
from kvbm_core.trtllm import KvCacheConnectorWorker, engine_args
from kvbm_core.trtllm.lifecycle import close_at_exit, configure_logging_once
from kvbm_core.worker import TransferEngine, build_tiers

log = structlog.get_logger("kvbm.connector")


class KvbmConnectorWorker(KvCacheConnectorWorker):
    """Every rank: executes the leader's operations on this rank's KV pool."""

    supports_attention_dp = False

    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        self._rank = engine_args.rank(llm_args)
        self._tokens_per_block = engine_args.tokens_per_block(llm_args)
        self._channel = channel_for(llm_args)
        self._registry = default_registry()
        self._pool: torch.Tensor | None = None
        self._layout: BlockLayout | None = None
        self._engine: TransferEngine | None = None
        self._tiers: dict[TierLevel, StorageTier] = {}
        self._stores_started_for = -1
        self._forward_end: tuple[int, torch.cuda.Event | None] = (-1, None)  # step, its forward-end event
        self._background_started_for = -1
        self._loads_started_for = -1
        self._saving: deque[int] = deque()  # pinned requests, in the order they finished
        self._failed_loads: dict[int, str] = {}  # request -> why its promised blocks did not load
        self._host_kind: str | None = None
        self._ready_sent = -1  # host slots last reported usable
        self._timing_start: tuple[int, TimeMark] | None = None
        self._timings: deque[tuple[int, TimeMark, TimeMark]] = deque(maxlen=64)  # (step, start, end)
        self._results_lock = threading.Lock()
        self._link: WorkerLink | None = None
        self._closed = False
        close_at_exit(self)

    # -- setup --------------------------------------------------------------------------------
    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        if self._pool is not None:
            raise RuntimeError("register_kv_caches called twice on one worker")
        self._pool = kv_cache_tensor
        self._layout = BlockLayout.from_pool(kv_cache_tensor, self._tokens_per_block)
        leader = self._channel.leader
        if leader is not None:
            self._setup(leader.on_worker_layout(self._rank, self._layout, int(kv_cache_tensor.shape[0])))
        # Otherwise (a rank in another process) the config arrives with the first step's metadata.

    def _setup(self, config: WorkerConfig) -> None:
        assert self._pool is not None and self._layout is not None
        configure_logging_once(config.settings)
        device = self._pool.device if self._pool.is_cuda else None
        self._tiers = build_tiers(config, self._layout, self._rank, device, self._registry)
        self._engine = TransferEngine(self._pool, self._layout, self._tiers, rank=self._rank)
        leader = self._channel.leader
        if leader is None and config.link is not None:  # a rank in another process than the leader
            self._link = WorkerLink(config.link, self._rank, self._on_leader_call)
        else:
            self._channel.worker = self
        if leader is not None and self._rank == 0:
            for allocation in config.tiers:
                tier = self._tiers.get(allocation.level)
                if isinstance(tier, BlockFileStorage):
                    leader.on_recovered(allocation.kind, *tier.recovered(), tier.recovery_report())
        self._host_kind = next((t.kind for t in config.tiers if t.level == TierLevel.HOST), None)
        self._report_readiness()
        log.info("kvbm worker ready", rank=self._rank, tiers=[t.kind for t in config.tiers])

    def bind_connector_meta(self, metadata: object) -> None:
        self._start_stores()  # the previous step's, if get_finished did not come in between
        super().bind_connector_meta(metadata)
        if not isinstance(metadata, StepOps):
            return
        if self._engine is None:
            if metadata.worker_config is None:
                if len(metadata):
                    raise RuntimeError(f"rank {self._rank} got operations before the kvbm worker config")
                return
            self._setup(metadata.worker_config)

    def _current_ops(self) -> StepOps | None:
        meta = self._metadata
        return meta if isinstance(meta, StepOps) and self._engine is not None else None

    # -- loads ---------------------------------------------------------------------------------
    def start_load_kv(self, stream: torch.cuda.Stream) -> None:
        ops = self._current_ops()
        if ops is None or ops.step == self._loads_started_for:
            return
        self._loads_started_for = ops.step
        compute = stream if self._pool is not None and self._pool.is_cuda else None
        self._engine.order_engine_writes(ops.fresh_blocks, compute)
        self._start_timing(ops.step, compute)
        loads = ops.select(LOADS)
        if loads:
            self._failed_loads.update(self._engine.start_loads(loads, compute))

    def wait_for_layer_load(self, layer_idx: int, stream: torch.cuda.Stream) -> None:
        """The compute stream waits for this layer's loads (GPU-side; whole-block loads were already
        waited for in ``start_load_kv``). A promised block that did not load stops the forward pass
        here (README, "Failures")."""
        if self._engine is not None and self._pool is not None and self._pool.is_cuda:
            self._engine.wait_layer(layer_idx, stream)
        self._raise_failed_loads()

    def _raise_failed_loads(self) -> None:
        if self._failed_loads:
            failed, self._failed_loads = self._failed_loads, {}
            raise KvbmLoadError(failed, "; ".join(sorted(set(failed.values()))))

    def save_kv_layer(self, layer_idx: int, stream: torch.cuda.Stream) -> None:
        """Nothing to do: stores start once the whole forward pass is done (CUDA-graph safe)."""

    # -- stores --------------------------------------------------------------------------------
    # A step's stores wait (GPU-side) for the event recorded when its forward pass ends, but are
    # issued only in ``get_finished``, after the engine queued its read of the sampled tokens: the
    # device -> host copy engine runs copies in the order they were queued, so stores issued at the
    # end of the forward pass would hold the sampler's few bytes behind them (measured on an H200:
    # +5% on prefill steps when nothing is reused). ``bind_connector_meta`` issues whatever a step
    # left, for an engine that skips ``get_finished``.
    def register_forward_pass_callable(self) -> Callable[[], None]:
        return self._on_forward_pass_done

    def _on_forward_pass_done(self) -> None:
        self._mark_forward_end(torch.cuda.current_stream() if self._pool is not None and self._pool.is_cuda else None)

    def wait_for_save(self, stream: torch.cuda.Stream) -> None:
        """Saves are asynchronous; only marks the forward end if the callable did not (and reports a
        failed load a forward pass without layer hooks did not)."""
        self._mark_forward_end(stream if self._pool is not None and self._pool.is_cuda else None)
        self._raise_failed_loads()

    def _mark_forward_end(self, stream: torch.cuda.Stream | None) -> None:
        ops = self._current_ops()
        if ops is None or self._forward_end[0] == ops.step:
            return
        self._end_timing(ops.step, stream)
        unwaited = self._engine.end_forward(stream)
        if unwaited:  # the forward pass may have read blocks before they arrived: fail them, never serve them
            self._failed_loads.update({r: "the forward pass ran without waiting for every layer's load"
                                       for r in unwaited})
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
        self._forward_end = (ops.step, event)

    # -- forward-pass timing (rank 0 of the leader's process: the cost model's prefill speed) -------
    def _start_timing(self, step: int, stream: torch.cuda.Stream | None) -> None:
        if self._rank != 0 or self._link is not None:
            return
        self._timing_start = (step, _mark(stream))

    def _end_timing(self, step: int, stream: torch.cuda.Stream | None) -> None:
        if self._timing_start is not None and self._timing_start[0] == step:
            self._timings.append((step, self._timing_start[1], _mark(stream)))
        self._timing_start = None

    def _report_timings(self) -> None:
        while self._timings and _done(self._timings[0][2]):
            step, start, end = self._timings.popleft()
            self._channel.report_timing(StepTiming(step, _elapsed(start, end)))

    def _start_stores(self) -> None:
        ops = self._current_ops()
        if ops is None or ops.step == self._stores_started_for or self._forward_end[0] != ops.step:
            return
        self._stores_started_for = ops.step
        stores = ops.select(STORES)
        if stores:
            self._engine.start_stores(stores, self._forward_end[1])
        self._start_background()

    def _start_background(self) -> None:
        """Host -> disk moves of this step. They run after this step's stores were queued (so the
        engine orders them behind any store into the same host slot), and also on iterations with
        no forward pass, where ``get_finished`` is the only call that comes."""
        ops = self._current_ops()
        if ops is None or ops.step == self._background_started_for:
            return
        self._background_started_for = ops.step
        background = ops.select(BACKGROUND)
        if background:
            self._engine.start_background(background)

    # -- completion ----------------------------------------------------------------------------
    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        """Saves: at most one per call, the oldest, once this rank drained it (TensorRT-LLM 1.2
        releases only the first request it is handed per call; every rank hands them in the same
        order, so the requests every rank reported grow by at most one per call). kvbm never loads
        asynchronously: ``started_loading_req_ids`` is always empty."""
        self._saving.extend(sorted(int(r) for r in finished_gen_req_ids))
        if self._engine is not None:
            self._start_stores()
            self._start_background()
            self.collect_results()
        pending = self._engine.pending if self._engine is not None else (lambda request_id: False)
        done_saving = [self._saving.popleft()] if self._saving and not pending(self._saving[0]) else []
        return done_saving, list(started_loading_req_ids)

    def take_failed_load_request_ids(self) -> set[int]:
        """Connector-manager variants that fail loads per request: always empty. kvbm promises only
        blocks whose bytes are already verified in host memory, and its loads finish inside the
        forward pass; a host-to-device copy that fails there is a CUDA error, raised."""
        return set()

    def abort_request(self, request_id: int) -> bool:
        """Variants with aborts: a rank holds nothing per request (stores in flight finish on their own
        and the engine's next writes to their blocks wait for them), so True: cleaned."""
        return True

    def collect_results(self) -> None:
        """This rank's finished operations, and how much of its host tier is usable, go to the leader
        (through memory, or the link)."""
        if self._engine is None:
            return
        with self._results_lock:
            self._report(self._engine.poll())
            self._report_readiness()
            self._report_timings()

    def _report_readiness(self) -> None:
        """The host tier grows after start (:attr:`HostStorage.ready_slots`): report each increase."""
        host = self._tiers.get(TierLevel.HOST) if self._host_kind is not None else None
        if host is None or host.ready_slots == self._ready_sent:
            return
        self._ready_sent = host.ready_slots
        ready = TierReady(self._rank, self._host_kind, self._ready_sent)
        if self._link is not None:
            self._link.send_ready(ready)
        else:
            self._channel.report_ready(ready)

    def _report(self, results: list[OpResult]) -> None:
        if not results:
            return
        if self._link is not None:
            self._link.send_results(results)
        else:
            self._channel.report(results)

    def stage(self, op: Op, timeout: float) -> OpResult:
        """Stage disk blocks into host slots now, for the leader (see :meth:`TransferEngine.run_now`)."""
        if self._engine is None:
            raise RuntimeError(f"rank {self._rank} has no kvbm tiers yet")
        return self._engine.run_now(op, timeout)

    def _on_leader_call(self, method: str, args: tuple) -> Any:
        """What the leader may ask of a rank in another process (see :mod:`kvbm_core.link`)."""
        if method == "collect":
            self.collect_results()
            return None
        if method == "stage":
            return self.stage(*args)
        raise ValueError(f"unknown call {method!r}")

    def wait_until_idle(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until no operation of this rank is in flight, and report
        every result to the leader; whether nothing is left in flight."""
        if self._engine is None:
            return True
        with self._results_lock:
            self._report(self._engine.drain(timeout))
            return not self._engine.in_flight

    # -- shutdown ------------------------------------------------------------------------------
    def close(self) -> None:
        """Drain in-flight operations (bounded) and release tier storage. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._engine is not None:
            self._report(self._engine.drain(timeout=30.0))
            self._engine.close()
        if self._link is not None:
            self._link.close()
        for tier in self._tiers.values():
            self._registry.close(tier)


TimeMark = Union[torch.cuda.Event, float]
"""A point in time: a timing event on a CUDA stream, or the host clock where there is none."""


def _mark(stream: torch.cuda.Stream | None) -> TimeMark:
    """A point in time: a timing event on ``stream`` (CUDA), else the host clock."""
    if stream is None:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def _done(mark: TimeMark) -> bool:
    return not isinstance(mark, torch.cuda.Event) or mark.query()


def _elapsed(start: TimeMark, end: TimeMark) -> float:
    if isinstance(start, torch.cuda.Event):
        return start.elapsed_time(end) / 1e3
    return end - start
