"""kvbm's TensorRT-LLM KV cache connector: ``connector_module: kvbm_core.trtllm.connector``.

Two classes, as TRT-LLM's PyTorch backend expects (``kv_connector_config``):

- :class:`KvbmConnectorLeader` (scheduler side, rank 0 only) turns engine callbacks into calls on
  the :class:`~kvbm_core.leader.BlockManager` and returns its :class:`~kvbm_core.ops.StepOps` as
  the per-step metadata (small, picklable: TRT-LLM broadcasts it to every rank).
- :class:`KvbmConnectorWorker` (every rank) executes those operations on the rank's KV pool through
  the :class:`~kvbm_core.worker.TransferEngine`.

``DynamoKVBMConnectorLeader`` / ``DynamoKVBMConnectorWorker`` are aliases, so the seed guide's YAML
works by changing only ``connector_module``.

Choices (documented for users in the README):

- **Loads** are synchronous, from host memory only: ``start_load_kv`` queues the host -> device
  copies on a load stream and makes the compute stream wait on them (no host sync). Disk blocks are
  staged into host slots and verified on every rank while the leader answers
  ``get_num_new_matched_tokens`` (:mod:`kvbm_core.leader.manager`, "Staging before promising"),
  so a promise never rests on bytes nobody checked.
- **Stores** copy after the forward pass wrote the KV: the forward-pass callable (or
  ``wait_for_save`` where the engine has no callable) records an event on the compute stream, and
  the copies wait on it GPU-side. They are issued in ``get_finished``, once the engine has queued
  its read of the sampled tokens, so that read never waits behind them on the device -> host copy
  engine. They never block the forward path.
- **Device blocks are never pinned** for a store: ``request_finished`` returns False, and the
  engine frees the request's blocks at once. A freed block a store still reads can be handed to
  another request only in a later step, and every block handed out in a step is listed in that
  step's metadata (``StepOps.fresh_blocks``): each rank's ``start_load_kv`` makes the compute
  stream wait for its own operations on those blocks before the forward pass writes them. (Pinning
  is the engine's other way, and TensorRT-LLM 1.2 releases at most one pinned request per poll and
  none while it idles.) With partial reuse and ``copy_on_partial_reuse`` on, TensorRT-LLM copies
  into a new block while it allocates, before ``start_load_kv``: there kvbm pins instead
  (``request_finished`` is True while a store of the request is in flight), and ``get_finished``
  reports at most one finished save per call, in the order the requests finished, the same on
  every rank, so that 1.2's loop releases every one of them.
- **A failed load** of a promised block (only a host -> device copy that did not happen: the bytes
  were verified before the promise) is never reported as loaded: the worker raises
  :class:`~kvbm_core.errors.KvbmLoadError` from the next ``wait_for_layer_load`` (or
  ``wait_for_save``), inside TensorRT-LLM's forward pass, whose error handling fails the batch;
  never from ``get_finished`` or ``start_load_kv``, where an exception ends TensorRT-LLM's executor.
  The leader drops the bad slots, so the next request with that prefix recomputes it.
- **Unsupported engine settings** (:mod:`kvbm_core.trtllm.engine_checks`, the rules ``kvbm doctor``
  applies too): block reuse off, pipeline or context parallelism, attention data parallelism, beam
  search, TRT-LLM's own ``host_cache_size``, the V2 KV cache manager or several attention windows
  are configuration errors at construction; partial reuse on is logged once (non-aligned device
  matches then match nothing). Multimodal and generation-only requests are left alone (no match,
  no offload), with a log line (TensorRT-LLM itself refuses generation-only requests before a
  connector sees them).
- ``supports_attention_dp`` is False on both classes: TensorRT-LLM 1.3+ refuses attention DP too.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
import torch

from kvbm_core.channel import TierAllocation, WorkerConfig, channel_for, release_channel
from kvbm_core.errors import ConfigError, KvbmLoadError
from kvbm_core.fingerprint import Fingerprint, fingerprint_weights
from kvbm_core.identity import RequestScope
from kvbm_core.interfaces import TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.link import LeaderLink, LinkError, WorkerLink
from kvbm_core.logging import configure as configure_logging
from kvbm_core.ops import BACKGROUND, LOADS, STORES, OpResult, StepOps, StepTiming, TierReady
from kvbm_core.registry import default_registry
from kvbm_core.settings import KvbmSettings, resolve_settings
from kvbm_core.storage import BlockFileStorage, RecoveryReport
from kvbm_core.trtllm import KvCacheConnectorScheduler, KvCacheConnectorWorker, SchedulerOutput
from kvbm_core.trtllm.engine_checks import check_engine_settings

if TYPE_CHECKING:
    from kvbm_core.leader import LeaderStats

log = structlog.get_logger("kvbm.connector")


@dataclass(frozen=True)
class PipelineInfo:
    """What ``kvbm_pipeline_built`` subscribers see: the settings and the tiers as sized."""

    settings: KvbmSettings
    tiers: tuple[TierAllocation, ...]
    layout: BlockLayout
    world_size: int
    model_id: str = ""
    namespace: bytes = b""  # the digest every stored block is namespaced by (WorkerConfig.namespace)


def _mapping(llm_args: Any) -> Any:
    parallel = getattr(llm_args, "parallel_config", None)
    return parallel.to_mapping() if parallel is not None and hasattr(parallel, "to_mapping") else None


def _tokens_per_block(llm_args: Any) -> int:
    return int(getattr(llm_args.kv_cache_config, "tokens_per_block", None) or 32)


def _world_size(llm_args: Any) -> int:
    mapping = _mapping(llm_args)
    if mapping is not None:
        return int(getattr(mapping, "tp_size", None) or getattr(mapping, "world_size", 1))
    return int(getattr(llm_args, "tensor_parallel_size", 1) or 1)


def _rank(llm_args: Any) -> int:
    mapping = _mapping(llm_args)
    return int(getattr(mapping, "rank", 0) or 0) if mapping is not None else 0


_logging_configured = threading.Event()


def _configure_logging(settings: KvbmSettings) -> None:
    """Once per engine process: kvbm's loggers in the format DYN_KVBM_LOG_FORMAT asks for."""
    if not _logging_configured.is_set():
        _logging_configured.set()
        configure_logging(settings.logging, scope="kvbm")


def _model_id(llm_args: Any) -> str:
    return str(getattr(llm_args, "model", "") or "")


def _capacity(llm_args: Any) -> tuple[int, int] | None:
    """``(max_num_tokens, max_batch_size)``: a step that fills either is a busy engine's."""
    tokens, batch = getattr(llm_args, "max_num_tokens", None), getattr(llm_args, "max_batch_size", None)
    return (int(tokens), int(batch)) if tokens and batch else None


def _log_fingerprint(fingerprint: Fingerprint, mode: str) -> None:
    if fingerprint.persistent:
        log.info("model weights fingerprinted", source=fingerprint.source, mode=mode, files=fingerprint.files,
                 mb_read=round(fingerprint.bytes_read / 1e6, 1), seconds=round(fingerprint.seconds, 3))
    else:
        log.warning("model weights not found: stored blocks are served only to this process "
                    "(no reuse across restarts or engines)", detail=fingerprint.source)


def _pins_finished_requests(llm_args: Any) -> bool:
    """Whether the engine may write a freed block outside the forward pass, before ``start_load_kv``
    can order that write after kvbm's stores: a partial-reuse copy, or KV arriving from a context
    server (disaggregated serving's cache transceiver). Only then does kvbm hold finished requests'
    blocks, while their stores run."""
    kv = llm_args.kv_cache_config
    partial_copy = getattr(kv, "enable_partial_reuse", False) and getattr(kv, "copy_on_partial_reuse", True)
    transceiver = getattr(llm_args, "cache_transceiver_config", None)
    return bool(partial_copy or getattr(transceiver, "backend", None))


def _is_generation_only(request: Any) -> bool:
    """A property on TRT-LLM's C++ request, a method on its Python subclass."""
    flag = getattr(request, "is_generation_only_request", False)
    return bool(flag() if callable(flag) else flag)


def request_scope(request: Any) -> RequestScope:
    """What besides the tokens separates this request's KV: its cache salt (the 1.3 string, else
    the runtime's integer id, which 1.2 requests and every binding carry) and its LoRA adapter."""
    salt = getattr(request, "cache_salt", None)
    salt_id = getattr(request, "cache_salt_id", None)
    lora = getattr(request, "lora_task_id", None)
    return RequestScope(
        cache_salt=None if salt is None else str(salt),
        cache_salt_id=None if salt is not None or salt_id is None else int(salt_id),
        lora_task_id=None if lora is None else int(lora),
    )


# ------------------------------------------------------------------------------------ leader
class KvbmConnectorLeader(KvCacheConnectorScheduler):
    """Scheduler side (rank 0): matching, slot bookkeeping and per-step operations."""

    supports_attention_dp = False

    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        check_engine_settings(llm_args)
        self._registry = default_registry()
        self._resolved = resolve_settings(registry=self._registry)
        settings = self._resolved.settings
        _configure_logging(settings)
        if not settings.tiers:
            raise ConfigError(
                "DYN_KVBM_CPU_CACHE_GB",
                "no kvbm tier is configured",
                ["DYN_KVBM_CPU_CACHE_GB", "DYN_KVBM_DISK_CACHE_GB", "DYN_KVBM_PROFILE"],
            )
        self._weights = fingerprint_weights(_model_id(llm_args), settings.weights_fingerprint,
                                            getattr(llm_args, "revision", None))
        _log_fingerprint(self._weights, settings.weights_fingerprint)
        self._tokens_per_block = _tokens_per_block(llm_args)
        self._world_size = _world_size(llm_args)
        self._manager: Any = None
        self._pipeline: PipelineInfo | None = None
        self._ready = threading.Event()
        self._pin_finished = _pins_finished_requests(llm_args)
        self._bypass: set[int] = set()
        self._channel = channel_for(llm_args)
        self._channel.leader = self
        self._link: LeaderLink | None = None
        self._closed = False
        atexit.register(_close_weakly, weakref.ref(self))
        log.info("kvbm leader created", profile=self._resolved.profile, tiers=[t.kind for t in settings.tiers])

    # -- the in-process endpoint rank 0's worker talks to ------------------------------------
    def on_worker_layout(self, rank: int, layout: BlockLayout, num_device_blocks: int) -> WorkerConfig:
        if layout.tokens_per_block != self._tokens_per_block:
            raise ConfigError(
                "kv_cache_config.tokens_per_block",
                f"worker reports {layout.tokens_per_block}, leader expects {self._tokens_per_block}",
            )
        if self._manager is None:
            from kvbm_core.leader import BlockManager

            if self._world_size > 1:  # the other ranks' workers live in other processes
                self._link = LeaderLink(self._channel.report, self._channel.report_ready)
            self._manager = BlockManager(
                self._resolved.settings,
                layout,
                world_size=self._world_size,
                model_id=_model_id(self._llm_args),
                weights=self._weights.digest,
                registry=self._registry,
                link=self._link.address if self._link is not None else None,
                stager=_RankStager(self._channel, self._link, self._world_size),
                host_grows=True,
                engine_capacity=_capacity(self._llm_args),
            )
            config = self._manager.worker_config
            self._pipeline = PipelineInfo(self._resolved.settings, config.tiers, layout, self._world_size,
                                          _model_id(self._llm_args), config.namespace)
            self._registry.notify("kvbm_pipeline_built", pipeline=self._pipeline)
            self._ready.set()
            log.info(
                "kvbm pipeline built",
                tiers={t.kind: t.num_slots for t in config.tiers},
                bytes_per_block=layout.bytes_per_block,
                device_blocks=num_device_blocks,
            )
        return self._manager.worker_config

    @property
    def stats(self) -> LeaderStats | None:
        """The block manager's accounting (blocks per route, hit rates, matched tokens), with every
        operation result the workers have finished so far applied; ``None`` until they registered."""
        if self._manager is None:
            return None
        if self._link is not None:
            try:
                self._link.call(self._link.connected_ranks, "collect", (), timeout=30.0)
            except LinkError as exc:
                log.warning("could not collect every rank's results", error=str(exc))
        return self._block_manager().stats

    def on_recovered(self, kind: str, slots: np.ndarray, keys: np.ndarray, report: RecoveryReport) -> None:
        if len(slots):
            self._manager.recovered(kind, slots, keys)
            log.info("disk blocks recovered from a previous run", tier=kind, blocks=int(len(slots)))
        self._registry.notify("kvbm_tier_recovered", tier=kind, recovered=int(len(slots)),
                              discarded=dict(report.discarded))

    # -- TRT-LLM scheduler API ---------------------------------------------------------------
    def _block_manager(self) -> Any:
        if self._manager is None:
            timeout = self._resolved.settings.leader_worker_init_timeout_secs
            if not self._ready.wait(timeout):
                raise TimeoutError(
                    f"kvbm workers did not register their KV pool within {timeout:g} s "
                    "(DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS)"
                )
        self._channel.collect()
        for ready in self._channel.drain_ready():
            self._manager.tier_ready(ready.rank, ready.kind, ready.slots)
        for timing in self._channel.drain_timings():
            self._manager.observe_forward(timing.step, timing.seconds)
        self._manager.apply_results(self._channel.drain())
        return self._manager

    def wait_for_initialization(self) -> None:
        """TensorRT-LLM 1.3+: return once every rank registered its KV pool (or time out naming the setting)."""
        self._block_manager()

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        request_id = int(request.request_id)
        if _is_generation_only(request) or getattr(request, "multimodal_positions", None):
            self._bypass.add(request_id)
            log.info("request left to the engine (multimodal or generation-only)", request_id=request_id)
            return 0, False
        manager = self._block_manager()
        match = manager.match(
            request_id,
            list(request.get_tokens(0)),
            int(num_computed_tokens),
            scope=request_scope(request),
        )
        return int(match.num_tokens), False

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        request_id = int(request.request_id)
        if request_id not in self._bypass:
            self._block_manager().allocated(request_id, list(block_ids))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> StepOps:
        manager = self._block_manager()
        bypass = self._bypass
        reports = [*scheduler_output.new_requests, *scheduler_output.cached_requests]
        fresh = [block for report in reports for block in report.new_block_ids]  # bypassed ones too
        new = [r for r in scheduler_output.new_requests if r.request_id not in bypass]
        cached = [r for r in scheduler_output.cached_requests if r.request_id not in bypass]
        return manager.schedule(new, cached, fresh_blocks=fresh)

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        """False: the engine may free the blocks now (see "Device blocks are never pinned")."""
        request_id = int(request.request_id)
        if request_id in self._bypass:
            self._bypass.discard(request_id)
            return False
        if self._manager is None:
            return False
        in_flight = self._block_manager().finish(request_id)
        return self._pin_finished and in_flight

    def abort_request(self, request_id: int, reason: str = "") -> bool:
        """Connector-manager variants with aborts: forget the request as if it finished. True: nothing
        of it is left that holds a device block (stores in flight are ordered before any reuse)."""
        request_id = int(request_id)
        self._bypass.discard(request_id)
        if self._manager is not None:
            self._block_manager().finish(request_id)
        log.info("request aborted by the engine", request_id=request_id, reason=reason)
        return True

    def finish_load(self, request_id: int) -> bool:
        """Variants that confirm a finished load: kvbm's loads finish inside the forward pass, so always True."""
        return True

    # -- shutdown ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the pipeline's subscribers (metrics server). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pipeline is not None:
            self._registry.notify("kvbm_pipeline_closed", pipeline=self._pipeline)
        if self._link is not None:
            self._link.close()
        if self._channel.leader is self:
            self._channel.leader = None
        release_channel(self._llm_args)


class _RankStager:
    """Runs a staging operation on every rank at once: the leader's own process through memory, the
    other ranks over the link (sent first, so they work while rank 0 does)."""

    def __init__(self, channel: Any, link: LeaderLink | None, world_size: int) -> None:
        self._channel = channel
        self._link = link
        self._remote = frozenset(range(1, world_size))

    def ready(self) -> bool:
        if self._channel.worker is None:
            return False
        return not self._remote or (self._link is not None and self._remote <= self._link.connected_ranks)

    def run(self, op: Any, timeout: float) -> list[OpResult]:
        pending = self._link.start_call(self._remote, "stage", (op, timeout)) if self._link is not None else {}
        results = [self._channel.worker.stage(op, timeout)]
        if pending:
            results += self._link.wait(pending, "stage", timeout + 1.0).values()
        return results


# ------------------------------------------------------------------------------------ worker
class KvbmConnectorWorker(KvCacheConnectorWorker):
    """Every rank: executes the leader's operations on this rank's KV pool."""

    supports_attention_dp = False

    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        self._rank = _rank(llm_args)
        self._tokens_per_block = _tokens_per_block(llm_args)
        self._channel = channel_for(llm_args)
        self._registry = default_registry()
        self._pool: torch.Tensor | None = None
        self._layout: BlockLayout | None = None
        self._engine: Any = None
        self._tiers: dict[TierLevel, Any] = {}
        self._stores_started_for = -1
        self._forward_end: tuple[int, torch.cuda.Event | None] = (-1, None)  # step, its forward-end event
        self._background_started_for = -1
        self._loads_started_for = -1
        self._saving: deque[int] = deque()  # pinned requests, in the order they finished
        self._failed_loads: dict[int, str] = {}  # request -> why its promised blocks did not load
        self._host_kind: str | None = None
        self._ready_sent = -1  # host slots last reported usable
        self._timing_start: tuple[int, Any] | None = None
        self._timings: deque[tuple[int, Any, Any]] = deque(maxlen=64)  # (step, start, end) marks
        self._results_lock = threading.Lock()
        self._link: WorkerLink | None = None
        self._closed = False
        atexit.register(_close_weakly, weakref.ref(self))

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
        from kvbm_core.worker import TransferEngine, build_tiers

        assert self._pool is not None and self._layout is not None
        _configure_logging(config.settings)
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

    def stage(self, op: Any, timeout: float) -> OpResult:
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


def _mark(stream: torch.cuda.Stream | None) -> Any:
    """A point in time: a timing event on ``stream`` (CUDA), else the host clock."""
    if stream is None:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def _done(mark: Any) -> bool:
    return not isinstance(mark, torch.cuda.Event) or mark.query()


def _elapsed(start: Any, end: Any) -> float:
    if isinstance(start, torch.cuda.Event):
        return start.elapsed_time(end) / 1e3
    return end - start


def _close_weakly(ref: "weakref.ref[Any]") -> None:
    obj = ref()
    if obj is not None:
        try:
            obj.close()
        except Exception:  # at interpreter exit, never turn a clean shutdown into a crash
            log.exception("kvbm close at exit failed")


DynamoKVBMConnectorLeader = KvbmConnectorLeader
DynamoKVBMConnectorWorker = KvbmConnectorWorker

__all__ = [
    "DynamoKVBMConnectorLeader",
    "DynamoKVBMConnectorWorker",
    "KvbmConnectorLeader",
    "KvbmConnectorWorker",
    "PipelineInfo",
]
