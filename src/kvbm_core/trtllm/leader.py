"""The scheduler side of kvbm's connector (rank 0): TensorRT-LLM's scheduler callbacks become calls on
the :class:`~kvbm_core.leader.BlockManager`, whose :class:`~kvbm_core.ops.StepOps` are the per-step
metadata TensorRT-LLM broadcasts to every rank (see :mod:`kvbm_core.trtllm.connector` for the
choices behind it)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import structlog

from kvbm_core.channel import LocalChannel, channel_for, release_channel
from kvbm_core.errors import ConfigError
from kvbm_core.fingerprint import Fingerprint, fingerprint_weights
from kvbm_core.layout import BlockLayout
from kvbm_core.leader import BlockManager, LeaderStats
from kvbm_core.link import LeaderLink, LinkError
from kvbm_core.ops import Op, OpResult, StepOps, TierAllocation, WorkerConfig
from kvbm_core.registry import default_registry
from kvbm_core.settings import KvbmSettings, resolve_settings
from kvbm_core.storage import RecoveryReport
from kvbm_core.trtllm import KvCacheConnectorScheduler, SchedulerOutput, engine_args
from kvbm_core.trtllm.engine_checks import check_engine_settings
from kvbm_core.trtllm.lifecycle import close_at_exit, configure_logging_once

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


def _log_fingerprint(fingerprint: Fingerprint, mode: str) -> None:
    if fingerprint.persistent:
        log.info("model weights fingerprinted", source=fingerprint.source, mode=mode, files=fingerprint.files,
                 mb_read=round(fingerprint.bytes_read / 1e6, 1), seconds=round(fingerprint.seconds, 3))
    else:
        log.warning("model weights not found: stored blocks are served only to this process "
                    "(no reuse across restarts or engines)", detail=fingerprint.source)


class KvbmConnectorLeader(KvCacheConnectorScheduler):
    """Scheduler side (rank 0): matching, slot bookkeeping and per-step operations."""

    supports_attention_dp = False

    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        check_engine_settings(llm_args)
        self._registry = default_registry()
        self._resolved = resolve_settings(registry=self._registry)
        settings = self._resolved.settings
        configure_logging_once(settings)
        if not settings.tiers:
            raise ConfigError(
                "DYN_KVBM_CPU_CACHE_GB",
                "no kvbm tier is configured",
                ["DYN_KVBM_CPU_CACHE_GB", "DYN_KVBM_DISK_CACHE_GB", "DYN_KVBM_PROFILE"],
            )
        self._weights = fingerprint_weights(engine_args.model_id(llm_args), settings.weights_fingerprint,
                                            getattr(llm_args, "revision", None))
        _log_fingerprint(self._weights, settings.weights_fingerprint)
        self._tokens_per_block = engine_args.tokens_per_block(llm_args)
        self._world_size = engine_args.world_size(llm_args)
        self._manager: BlockManager | None = None
        self._pipeline: PipelineInfo | None = None
        self._ready = threading.Event()
        self._pin_finished = engine_args.pins_finished_requests(llm_args)
        self._bypass: set[int] = set()
        self._channel = channel_for(llm_args)
        self._channel.leader = self
        self._link: LeaderLink | None = None
        self._closed = False
        close_at_exit(self)
        log.info("kvbm leader created", profile=self._resolved.profile, tiers=[t.kind for t in settings.tiers])

    # -- the in-process endpoint rank 0's worker talks to ------------------------------------
    def on_worker_layout(self, rank: int, layout: BlockLayout, num_device_blocks: int) -> WorkerConfig:
        if layout.tokens_per_block != self._tokens_per_block:
            raise ConfigError(
                "kv_cache_config.tokens_per_block",
                f"worker reports {layout.tokens_per_block}, leader expects {self._tokens_per_block}",
            )
        if self._manager is None:
            if self._world_size > 1:  # the other ranks' workers live in other processes
                self._link = LeaderLink(self._channel.report, self._channel.report_ready)
            self._manager = BlockManager(
                self._resolved.settings,
                layout,
                world_size=self._world_size,
                model_id=engine_args.model_id(self._llm_args),
                weights=self._weights.digest,
                registry=self._registry,
                link=self._link.address if self._link is not None else None,
                stager=_RankStager(self._channel, self._link, self._world_size),
                host_grows=True,
                engine_capacity=engine_args.capacity(self._llm_args),
            )
            config = self._manager.worker_config
            self._pipeline = PipelineInfo(self._resolved.settings, config.tiers, layout, self._world_size,
                                          engine_args.model_id(self._llm_args), config.namespace)
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
    def _block_manager(self) -> BlockManager:
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
        if engine_args.is_generation_only(request) or getattr(request, "multimodal_positions", None):
            self._bypass.add(request_id)
            log.info("request left to the engine (multimodal or generation-only)", request_id=request_id)
            return 0, False
        manager = self._block_manager()
        match = manager.match(
            request_id,
            list(request.get_tokens(0)),
            int(num_computed_tokens),
            scope=engine_args.request_scope(request),
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

    def __init__(self, channel: LocalChannel, link: LeaderLink | None, world_size: int) -> None:
        self._channel = channel
        self._link = link
        self._remote = frozenset(range(1, world_size))

    def ready(self) -> bool:
        if self._channel.worker is None:
            return False
        return not self._remote or (self._link is not None and self._remote <= self._link.connected_ranks)

    def run(self, op: Op, timeout: float) -> list[OpResult]:
        pending = self._link.start_call(self._remote, "stage", (op, timeout)) if self._link is not None else {}
        results = [self._channel.worker.stage(op, timeout)]
        if pending:
            results += self._link.wait(pending, "stage", timeout + 1.0).values()
        return results
