"""The reference executor: TensorRT-LLM's PyExecutor loop, V1 KV manager and a real decoder, on CPU or GPU.

It drives any connector given as ``(scheduler class, worker class)``, or none (the baseline), in the
call order of TensorRT-LLM's 1.2 or 1.3 line (``ExecutorConfig.trtllm``). Construction: both
classes built concurrently per rank, forward-pass callables registered, model warmup (the callables
run; no other connector call), then ``register_kv_caches`` once per rank (1.3: then the scheduler's
``wait_for_initialization``). Each loop iteration:

1. admit arrived requests; schedule (GUARANTEED_NO_EVICT capacity, ``max_batch_size``,
   ``max_num_tokens``, chunked prefill): decode steps first, then context chunks, first come first
   served;
2. ``prepare_resources``: ``add_sequence`` for first chunks (device prefix match, then
   ``get_num_new_matched_tokens`` with the request's C++ binding, prepopulated length, then
   ``update_state_after_alloc``), ``add_token`` for decode steps, then the ``SchedulerOutput``
   (built by :class:`~kvbm_core.testing.connector_manager.ConnectorManager` from
   ``get_cache_indices`` and each request's state);
3. park asynchronously loading requests, ``build_connector_meta`` -> ``bind_connector_meta`` on every
   rank, ``start_load_kv``;
4. if anything is left: the forward pass (per layer ``wait_for_layer_load`` / ``save_kv_layer``
   unless it is a decode-only step in CUDA-graph mode), the forward-pass callables,
   ``wait_for_save``, sampling; then cancellations, ``request_finished`` for finished requests
   (``True`` pins their blocks), and the prompt blocks of finished prefills become reusable;
5. ``get_finished`` on every rank: saves reported by all ranks unpin their blocks - on the 1.2 line
   only the first of them per call (TensorRT-LLM 1.2 leaves the loop after one unpin; the others
   stay pinned), on 1.3 all of them; loads reported by all ranks send their request back to be
   scheduled.

Failures propagate as in TensorRT-LLM: an exception raised by a connector inside the forward pass
(layer hooks, forward-pass callable, ``wait_for_save``) fails every active request with its message
(``_handle_errors``); with the overlap scheduler the executor then stops (TensorRT-LLM asserts that
sampling ran), without it the loop goes on. An exception from any other connector call stops the
executor (it leaves :meth:`ReferenceExecutor.run`).

Idle: like TensorRT-LLM, the loop blocks on its request queue when no request is active or waiting,
so ``get_finished`` is not polled while requests are only saving. :meth:`ReferenceExecutor.run`
returns once every request has finished; saves still pending then show in
:attr:`RunResult.pending_saves` and :attr:`RunResult.pinned_blocks` (they are polled again when the
next run starts).

Dynamic arrivals: ``run(specs, on_finish=f)`` calls ``f(index, result)`` as each request finishes
(its last token appended, or cancelled) with its index in :attr:`RunResult.requests` and its
:class:`RequestResult`; the specs ``f`` returns join the same run with the next indices, in the
order returned, and arrive by their own ``arrival_step`` / ``arrival_time_s`` (one already past
arrives at the next admission). A multi-turn client is written this way: the next turn's prompt
holds the answer just generated.

With ``overlap_scheduler`` the results of iteration N (appended tokens, ``request_finished``,
reusable prompt blocks) are handled in iteration N+1, after its forward pass, as in TRT-LLM's
``_executor_loop_overlap``. On the 1.2 line a request is scheduled once more after its last token
was sampled (N+1 forward passes for N tokens); on 1.3 it is not.

Simulated TP ranks share one model forward; rank ``r`` holds KV heads ``r*h .. (r+1)*h`` of every
block in its own pool tensor. Streams passed to workers: ``torch.cuda.current_stream()`` on a GPU,
``torch.cpu.current_stream()`` on CPU (which has no ``synchronize``: work there is synchronous).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvbm_core.errors import ConfigError
from kvbm_core.testing.connector_manager import CallCounts, ConnectorManager, TrtllmLine
from kvbm_core.testing.errors import ContractViolation, ExecutorStopped, OracleMismatch
from kvbm_core.testing.kv_manager import KvCacheManager
from kvbm_core.testing.llm_args import (
    CudaGraphConfig,
    KvCacheConfig,
    KvCacheConnectorConfig,
    ParallelConfig,
    TorchLlmArgs,
)
from kvbm_core.testing.model import Piece, ReferenceModel
from kvbm_core.testing.oracle import KvOracle
from kvbm_core.testing.pool import KvPools
from kvbm_core.testing.request import LlmRequest, LlmRequestState, LlmRequestV13, RequestSpec, cache_salt_id
from kvbm_core.testing.results import RequestResult, RunResult, StepRecord
from kvbm_core.testing.run_state import ForwardResult, RequestTrack, RunState, RunTally, ScheduledItem
from kvbm_core.testing.shapes import ModelShape, resolve_shape

_IDLE_SLEEP_S = 0.0005


@dataclass(frozen=True)
class ExecutorConfig:
    """The engine settings TRT-LLM would take from ``llm_args``, plus the harness's own switches.

    ``device="cuda"`` puts the model and every rank's pool on the GPU (one GPU holds all simulated
    ranks); the forward runs on the current stream. ``oracle`` recomputes every reused or onboarded
    prefix and compares it layer by layer (expensive); on GPU give it ``oracle_tolerance``.
    """

    model: str | ModelShape = "tiny"
    seed: int = 0
    device: str = "cpu"
    tokens_per_block: int = 32
    num_blocks: int = 256  # device pool blocks
    max_batch_size: int = 8
    max_num_tokens: int = 8192  # tokens per forward pass
    max_seq_len: int = 1024
    enable_chunked_prefill: bool = False
    enable_block_reuse: bool = True
    enable_partial_reuse: bool = False  # reported in llm_args only: the KV manager reuses whole blocks
    overlap_scheduler: bool = False
    cuda_graphs: bool = False  # decode-only steps run without per-layer hooks
    tp_size: int = 1
    trtllm: TrtllmLine = "1.2"  # which TensorRT-LLM line's executor and connector manager to follow
    strict: bool = False  # also check what TRT-LLM does not (ContractViolation naming the method)
    oracle: bool = False  # compare reused/onboarded KV with recomputation, layer by layer
    oracle_tolerance: float = 0.0  # 0: bit-exact
    model_mode: str | None = None  # see ReferenceModel (exact, batch_invariant, fast); None: its default
    free_gpu_memory_fraction: float = 0.9  # reported in llm_args only
    idle_timeout_s: float = 60.0  # the harness's bound: no progress for this long with a request parked
    weights_dir: str | None = None  # write the model's weights here and serve it as llm_args.model (a path)

    def __post_init__(self) -> None:
        tpb = self.tokens_per_block
        if tpb <= 0 or tpb & (tpb - 1):
            raise ConfigError("tokens_per_block", f"must be a power of two, got {tpb}")
        if self.trtllm not in ("1.2", "1.3"):
            raise ConfigError("trtllm", f"got {self.trtllm!r}", ("1.2", "1.3"))
        if self.tp_size < 1:
            raise ConfigError("tp_size", f"must be >= 1, got {self.tp_size}")
        if self.enable_chunked_prefill and self.max_num_tokens < tpb:
            raise ConfigError(
                "max_num_tokens", f"chunked prefill needs at least one block ({tpb}), got {self.max_num_tokens}"
            )
        if self.max_batch_size < 1 or self.max_num_tokens < 1 or self.max_seq_len < 2:
            raise ConfigError("ExecutorConfig", "max_batch_size, max_num_tokens and max_seq_len must be positive")
        if self.oracle_tolerance < 0:
            raise ConfigError("oracle_tolerance", f"must be >= 0, got {self.oracle_tolerance}")


def _arrival_order(t: RequestTrack) -> tuple[int, float, int]:
    return t.spec.arrival_step, t.spec.arrival_time_s or 0.0, t.index


class ReferenceExecutor:
    """See the module docstring. ``connector``: ``(scheduler_cls, worker_cls)`` or ``None``."""

    def __init__(
        self,
        config: ExecutorConfig | None = None,
        connector: tuple[type, type] | None = None,
        model: ReferenceModel | None = None,
    ):
        self.config = cfg = config or ExecutorConfig()
        shape = resolve_shape(cfg.model)
        if model is None:
            model = ReferenceModel(
                shape, seed=cfg.seed, device=cfg.device, max_seq_len=cfg.max_seq_len, mode=cfg.model_mode
            )
        elif model.shape != shape or model.device != torch.device(cfg.device) or model.max_seq_len < cfg.max_seq_len:
            raise ConfigError(
                "model", "the given model's shape, device or max_seq_len does not match the ExecutorConfig"
            )
        self.model = model
        self.pools = KvPools(model.pool_geometry(cfg.num_blocks, cfg.tokens_per_block, cfg.tp_size), cfg.device)
        self.kv_manager = KvCacheManager(cfg.num_blocks, cfg.tokens_per_block, cfg.enable_block_reuse)
        self.llm_args = self._llm_args(shape, connector)
        self._oracle = KvOracle(model, cfg.tokens_per_block, cfg.oracle_tolerance) if cfg.oracle else None
        self.connector: ConnectorManager | None = None
        if connector is not None:
            self.connector = ConnectorManager(connector[0], connector[1], self.llm_args, cfg.trtllm,
                                              strict=cfg.strict, block_hashes=self._block_hashes)
        self._warmup()
        if self.connector is not None:
            self.connector.register_kv_caches(self.pools.tensors)
            if cfg.trtllm == "1.3":
                self.connector.wait_for_initialization()
        self._next_request_id = 1
        self._in_transmission: dict[int, RequestTrack] = {}  # finished, blocks pinned for an async save

    @property
    def scheduler(self) -> Any:
        return None if self.connector is None else self.connector.scheduler

    @property
    def workers(self) -> list[Any]:
        return [] if self.connector is None else self.connector.workers

    def _llm_args(self, shape: ModelShape, connector: tuple[type, type] | None) -> TorchLlmArgs:
        cfg = self.config
        conn_cfg = None
        if connector is not None:
            conn_cfg = KvCacheConnectorConfig(
                connector[0].__module__, connector[0].__qualname__, connector[1].__qualname__
            )
        if cfg.weights_dir is not None:
            self.model.save_weights(cfg.weights_dir)
        return TorchLlmArgs(
            model=cfg.weights_dir or f"kvbm-reference/{shape.name}",
            tensor_parallel_size=cfg.tp_size,
            parallel_config=ParallelConfig(tp_size=cfg.tp_size, rank=0),
            kv_cache_config=KvCacheConfig(
                tokens_per_block=cfg.tokens_per_block,
                enable_block_reuse=cfg.enable_block_reuse,
                enable_partial_reuse=cfg.enable_partial_reuse,
                free_gpu_memory_fraction=cfg.free_gpu_memory_fraction,
                max_tokens=cfg.num_blocks * cfg.tokens_per_block,
            ),
            kv_connector_config=conn_cfg,
            max_seq_len=cfg.max_seq_len,
            max_batch_size=cfg.max_batch_size,
            max_num_tokens=cfg.max_num_tokens,
            enable_chunked_prefill=cfg.enable_chunked_prefill,
            disable_overlap_scheduler=not cfg.overlap_scheduler,
            cuda_graph_config=CudaGraphConfig() if cfg.cuda_graphs else None,
            dtype=shape.dtype,
            kv_cache_dtype=str(self.pools.geometry.dtype).removeprefix("torch."),
        )

    def _stream(self) -> Any:
        if self.pools.device.type == "cuda":
            return torch.cuda.current_stream(self.pools.device)
        return torch.cpu.current_stream()

    def _warmup(self) -> None:
        """A throwaway forward pass through the real pool (its blocks are left dirty), before registration."""
        cfg = self.config
        n = min(
            cfg.max_num_tokens, cfg.max_seq_len - 1, 2 * cfg.tokens_per_block, cfg.num_blocks * cfg.tokens_per_block
        )
        self.kv_manager.add_sequence(-1, [0] * n, None, None)
        (sample,) = self.model.forward([Piece(self.kv_manager.get_cache_indices(-1), 0, [0] * n, True)], self.pools)
        if self.connector is not None:
            self.connector.forward_pass_done()
        assert sample is not None
        int(sample)
        self.kv_manager.release(-1, [], 0, lambda i: 0)

    # -- the run loop -------------------------------------------------------------------------

    def run(
        self,
        requests: Iterable[RequestSpec],
        on_finish: Callable[[int, RequestResult], Iterable[RequestSpec]] | None = None,
    ) -> RunResult:
        """Serve ``requests`` until every one has finished (see "Idle" in the module docstring).

        ``on_finish``: see "Dynamic arrivals" in the module docstring.
        """
        specs = list(requests)
        tracks = [self._track(i, spec) for i, spec in enumerate(specs)]
        order = sorted(tracks, key=_arrival_order)
        calls_before = self.connector.calls() if self.connector is not None else None
        stats_before = replace(self.kv_manager.stats)
        run = RunState(tracks, time.perf_counter(), deque(order), on_finish=on_finish)
        run.by_id = {t.rid: t for t in tracks}
        while run.arrivals or run.busy():
            self._iteration(run)
        wall = run.now()
        if calls_before is not None:
            self._check_call_counts(calls_before, self.connector.calls(), run.tally)
        return RunResult(
            requests=tuple(t.result() for t in run.tracks),
            steps=tuple(run.steps),
            counters=run.tally.counters(stats_before, self.kv_manager.stats),
            calls=self.connector.calls() if self.connector is not None else None,
            wall_s=wall,
            pending_saves=tuple(sorted(self._in_transmission)),
            pinned_blocks=self.kv_manager.num_pinned_blocks,
        )

    def _track(self, index: int, spec: RequestSpec) -> RequestTrack:
        cfg = self.config
        prompt_len = len(spec.prompt)
        if prompt_len + spec.max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"request {index}: prompt + max_new_tokens exceeds max_seq_len {cfg.max_seq_len}")
        if not cfg.enable_chunked_prefill and prompt_len > cfg.max_num_tokens:
            raise ValueError(
                f"request {index}: prompt {prompt_len} > max_num_tokens {cfg.max_num_tokens} without chunked prefill"
            )
        if min(spec.prompt) < 0 or max(spec.prompt) >= self.model.shape.vocab_size:
            raise ValueError(f"request {index}: token ids must lie in [0, {self.model.shape.vocab_size})")
        blocks_total = math.ceil((prompt_len + spec.max_new_tokens) / cfg.tokens_per_block)
        if blocks_total > cfg.num_blocks:
            raise ValueError(f"request {index} needs {blocks_total} blocks; the pool has {cfg.num_blocks}")
        fields: dict[str, Any] = dict(
            request_id=self._next_request_id,
            prompt_len=prompt_len,
            max_new_tokens=spec.max_new_tokens,
            cache_salt_id=None if spec.cache_salt is None else cache_salt_id(spec.cache_salt),
            lora_task_id=spec.lora_task_id,
            kv_cache_retention_config=spec.retention,
            generation_only=spec.generation_only,
            _tokens=list(spec.prompt),
        )
        if cfg.trtllm == "1.3":
            request: LlmRequest = LlmRequestV13(**fields, cache_salt=spec.cache_salt)
        else:
            request = LlmRequest(**fields)
        self._next_request_id += 1
        return RequestTrack(index, spec, request, blocks_total)

    def _iteration(self, run: RunState) -> None:
        start = run.now()
        if not run.busy():
            self._skip_to_next_arrival(run)
        admitted = self._admit_arrivals(run)
        items = self._schedule(run)
        if items:
            run.tally.scheduled_iterations += 1
            self._prepare_resources(run, items)
            if self.connector is not None:
                items = self._start_batch(items)
        forward = self._forward(run, items) if items else None
        finished = self._handle_results(run, forward)
        polled = self._terminate_finished_transfers(run) if self.connector is not None else False
        run.tally.iterations += 1
        if forward is not None or finished or polled or admitted:
            run.last_progress = run.now()
            run.steps.append(
                StepRecord(
                    iteration=run.iteration,
                    start_s=start,
                    duration_s=run.now() - start,
                    forward_s=0.0 if forward is None else forward.forward_s,
                    context_tokens=0 if forward is None else forward.context_tokens,
                    generation_tokens=0 if forward is None else forward.generation_tokens,
                    layer_hooks=forward is not None and forward.layer_hooks,
                )
            )
        else:
            self._idle(run)
        run.iteration += 1

    def _skip_to_next_arrival(self, run: RunState) -> None:
        """An idle executor waits for the next request instead of spinning (TRT-LLM blocks on its queue)."""
        if not run.arrivals:
            return
        nxt = run.arrivals[0]
        run.iteration = max(run.iteration, nxt.spec.arrival_step)
        if nxt.spec.arrival_time_s is not None:
            delay = nxt.spec.arrival_time_s - run.now()
            if delay > 0:
                time.sleep(delay)

    def _admit_arrivals(self, run: RunState) -> bool:
        admitted = False
        now = run.now()
        while run.arrivals:
            t = run.arrivals[0]
            if t.spec.arrival_step > run.iteration:
                break
            if t.spec.arrival_time_s is not None and t.spec.arrival_time_s > now:
                break
            run.arrivals.popleft()
            t.arrival_s = now if t.spec.arrival_time_s is None else t.spec.arrival_time_s
            run.waiting.append(t)
            admitted = True
        return admitted

    def _idle(self, run: RunState) -> None:
        if run.now() - run.last_progress > self.config.idle_timeout_s:
            saving, loading = self.connector.outstanding() if self.connector is not None else (set(), set())
            raise ContractViolation(
                "get_finished",
                f"no progress for {self.config.idle_timeout_s}s; not reported by every rank: "
                f"saves {sorted(saving)}, loads {sorted(loading)}",
            )
        time.sleep(_IDLE_SLEEP_S)

    # -- scheduling and resources -------------------------------------------------------------

    def _schedule(self, run: RunState) -> list[ScheduledItem]:
        cfg = self.config
        items: list[ScheduledItem] = []
        budget = cfg.max_num_tokens
        for t in run.active:
            if len(items) == cfg.max_batch_size or budget < 1:
                break
            if t.request.state is LlmRequestState.GENERATION_IN_PROGRESS and self._wants_decode(t):
                items.append(ScheduledItem(t, context=False))
                budget -= 1
        for t in run.active:
            if len(items) == cfg.max_batch_size:
                break
            if t.request.state is LlmRequestState.CONTEXT_INIT:
                chunk = self._chunk(t.request, budget)
                if chunk:
                    t.request.context_chunk_size = chunk
                    items.append(ScheduledItem(t, context=True))
                    budget -= chunk
        reserved = sum(t.blocks_total - self.kv_manager.blocks_held(t.rid) for t in run.active)
        available = self.kv_manager.num_available_blocks - reserved
        while run.waiting and len(items) < cfg.max_batch_size and len(run.active) < cfg.max_batch_size:
            t = run.waiting[0]
            chunk = self._chunk(t.request, budget)
            if t.blocks_total > available or not chunk:
                break  # first come, first served: nobody overtakes the head of the queue
            run.waiting.popleft()
            run.active.append(t)
            available -= t.blocks_total
            t.request.context_chunk_size = chunk
            items.append(ScheduledItem(t, context=True))
            budget -= chunk
        return items

    def _wants_decode(self, t: RequestTrack) -> bool:
        if self.config.overlap_scheduler and self.config.trtllm == "1.3":
            return len(t.generated) + (t.pending is not None) < t.spec.max_new_tokens
        return True  # 1.2 overlap: one more step after the last token was sampled

    def _chunk(self, request: LlmRequest, budget: int) -> int:
        remaining = request.context_remaining_length
        if remaining <= budget:
            return remaining
        if not self.config.enable_chunked_prefill:
            return 0
        tpb = self.config.tokens_per_block
        return budget // tpb * tpb

    def _prepare_resources(self, run: RunState, items: list[ScheduledItem]) -> None:
        """``KVCacheManager.prepare_resources``: first chunks get blocks, decode steps a token, then
        the connector's scheduler output."""
        for item in items:
            if item.context and not item.track.allocated and self._should_add_sequence(item.track):
                self._add_sequence(run, item.track)
        for item in items:
            if not item.context:
                self.kv_manager.add_token(item.track.rid)
        if self.connector is not None:
            self.connector.build_scheduler_output(
                [i.track.request for i in items if i.context],
                [i.track.request for i in items if not i.context],
                lambda request: self.kv_manager.get_cache_indices(request.request_id),
            )

    def _should_add_sequence(self, t: RequestTrack) -> bool:
        return self.connector is None or self.connector.should_add_sequence(t.request)

    def _add_sequence(self, run: RunState, t: RequestTrack) -> None:
        request, prompt = t.request, t.spec.prompt
        match = None
        if self.connector is not None and self.config.enable_block_reuse:
            connector = self.connector

            def match(num_computed_tokens: int) -> int:
                return connector.get_num_new_matched_tokens(request, num_computed_tokens)

        reused, external = self.kv_manager.add_sequence(t.rid, prompt, self._reuse_root(request), match)
        prepopulated = reused + external
        if prepopulated >= len(prompt):
            raise ContractViolation(
                "get_num_new_matched_tokens",
                f"There must be at least one uncomputed token in the prompt! (request {t.rid}: prompt_len "
                f"{len(prompt)}, device reuse {reused} + connector {external} tokens)",
            )
        self._set_prepopulated(request, prepopulated)
        t.allocated, t.reused, t.external = True, reused, external
        t.async_load = self.connector is not None and self.connector.is_loading_async(t.rid)
        t.kv_len = reused if t.async_load else prepopulated
        block_ids = self.kv_manager.get_cache_indices(t.rid)
        if len(block_ids) != math.ceil(len(prompt) / self.config.tokens_per_block):
            raise RuntimeError(f"request {t.rid}: {len(block_ids)} blocks allocated for a {len(prompt)}-token prompt")
        if self.connector is not None:
            self.connector.update_state_after_alloc(request, block_ids)
        if self._oracle is not None and prepopulated:
            t.truth = self._oracle.truth(prompt[:prepopulated])
        tally = run.tally
        tally.allocations += 1
        tally.device_reused_tokens += reused
        tally.connector_tokens += external
        tally.async_loads += t.async_load

    @staticmethod
    def _reuse_root(request: LlmRequest) -> tuple[int | None, int | None]:
        """What separates reuse trees besides tokens: the cache salt and the LoRA adapter."""
        return request.cache_salt_id, request.lora_task_id

    def _block_hashes(self, request: LlmRequest) -> list[int]:
        """1.3's ``RequestData.block_hashes``: the chain over the request's full blocks."""
        return self.kv_manager.block_hashes(request.get_tokens(0), self._reuse_root(request))

    def _set_prepopulated(self, request: LlmRequest, prepopulated: int) -> None:
        """TRT-LLM's ``setPrepopulatedPromptLen``: skip the prefix; a chunk still ends on a block boundary."""
        request.prepopulated_prompt_len = prepopulated
        if prepopulated == 0:
            return
        chunk = request.context_chunk_size
        if prepopulated + chunk < request.prompt_len:
            tpb = self.config.tokens_per_block
            chunk = (prepopulated + chunk) // tpb * tpb - prepopulated
        request.context_current_position = prepopulated
        request.context_chunk_size = chunk

    def _start_batch(self, items: list[ScheduledItem]) -> list[ScheduledItem]:
        """``_kv_connector_start_batch``: park async loads, build and bind the metadata, start loads."""
        assert self.connector is not None
        context = [i.track.request for i in items if i.context]
        staying = {id(r) for r in self.connector.take_scheduled_requests_pending_load(context)}
        self.connector.handle_metadata()
        self.connector.start_load_kv(self._stream())
        return [i for i in items if not i.context or id(i.track.request) in staying]

    # -- the forward pass ---------------------------------------------------------------------

    def _forward(self, run: RunState, items: list[ScheduledItem]) -> ForwardResult | None:
        """One forward pass; ``None`` when a connector call inside it raised (``_handle_errors`` ran)."""
        cfg = self.config
        connector = self.connector
        stream = self._stream()
        pieces: list[Piece] = []
        checks: list[tuple[RequestTrack, list[int]]] = []
        for item in items:
            t = item.track
            request = t.request
            block_ids = self.kv_manager.get_cache_indices(t.rid)
            if item.context:
                start = request.context_current_position
                n = min(request.context_remaining_length, request.context_chunk_size)
                pieces.append(
                    Piece(block_ids, start, t.spec.prompt[start : start + n], start + n == request.prompt_len)
                )
                if t.truth is not None:
                    checks.append((t, block_ids))
            else:
                pieces.append(Piece(block_ids, t.kv_len, [t.token_at(t.kv_len)], True))
        hooks = connector is not None and not (cfg.cuda_graphs and all(not i.context for i in items))
        oracle = self._oracle

        def pre_hook(layer: int) -> None:
            if hooks:
                connector.wait_for_layer_load(layer, stream)
            for t, block_ids in checks:
                oracle.check(t.rid, layer, self.pools, block_ids, t.truth)

        def post_hook(layer: int) -> None:
            connector.save_kv_layer(layer, stream)

        began = time.perf_counter()
        try:
            samples = self.model.forward(
                pieces,
                self.pools,
                pre_hook=pre_hook if hooks or checks else None,
                post_hook=post_hook if hooks else None,
            )
            if connector is not None:
                connector.forward_pass_done()
                connector.wait_for_save(stream)
        except OracleMismatch:
            raise  # the harness's own check, not an engine error
        except Exception as exc:  # PyExecutor._forward_step: log, fail every active request, go on
            self._handle_errors(run, f"{type(exc).__name__}: {exc}", exc)
            return None
        tokens = [None if s is None else int(s) for s in samples]
        forward_s = time.perf_counter() - began

        tally = run.tally
        tally.forwards += 1
        tally.forwards_with_layer_hooks += hooks
        result = ForwardResult(forward_s, hooks)
        for item, piece, token in zip(items, pieces, tokens, strict=True):
            t = item.track
            t.kv_len = piece.start + len(piece.tokens)
            if item.context:
                result.context_tokens += len(piece.tokens)
                tally.computed_prompt_tokens += len(piece.tokens)
                t.request.context_current_position += len(piece.tokens)
                if t.request.context_remaining_length == 0:
                    t.request.state = LlmRequestState.GENERATION_IN_PROGRESS
                    result.prefill_done.append(t)
            else:
                result.generation_tokens += 1
            if token is not None:
                result.samples.append((t, token))
        for t, _ in checks:
            tally.oracle_checked_tokens += t.truth[0][0].shape[1]
            t.truth = None
        return result

    def _handle_errors(self, run: RunState, message: str, cause: Exception) -> None:
        """``PyExecutor._handle_errors``: every active request ends with the error. With the overlap
        scheduler TensorRT-LLM then asserts that sampling ran and its executor thread ends."""
        run.tally.forward_errors += 1
        for t in list(run.active):
            t.error = message
            self._terminate(run, t, cancelled=True)
        if self.config.overlap_scheduler:
            raise ExecutorStopped(f"the executor loop ended: {message}") from cause

    # -- after the forward pass ---------------------------------------------------------------

    def _handle_results(self, run: RunState, forward: ForwardResult | None) -> bool:
        """Append sampled tokens, cancel, finish, make finished prefills reusable; whether anything moved."""
        overlap = self.config.overlap_scheduler
        ready = run.previous if overlap else forward
        if ready is not None:
            for t, token in ready.samples:
                if not t.done:
                    t.pending = None
                    self._append(run, t, token)
        if overlap and forward is not None:
            for t, token in forward.samples:
                if not t.done and len(t.generated) < t.spec.max_new_tokens:
                    t.pending = token
        progressed = ready is not None
        for t in [*run.waiting, *run.active]:
            k = t.spec.cancel_after_tokens
            if k is not None and k <= len(t.generated) < t.spec.max_new_tokens:
                self._terminate(run, t, cancelled=True)
                progressed = True
        for t in list(run.active):
            if len(t.generated) >= t.spec.max_new_tokens:
                self._terminate(run, t, cancelled=False)
                progressed = True
        if ready is not None:
            for t in ready.prefill_done:
                if not t.done:
                    self.kv_manager.store_context_blocks(t.rid, t.spec.prompt, t.kv_len, self._priority_of(t.request))
        if overlap:
            run.previous = forward
        return progressed

    def _priority_of(self, request: LlmRequest) -> Callable[[int], int]:
        tpb = self.config.tokens_per_block
        return lambda block_index: request.block_priority(block_index, tpb)

    def _append(self, run: RunState, t: RequestTrack, token: int) -> None:
        t.generated.append(token)
        t.request._tokens.append(token)
        if t.first_token_s is None:
            t.first_token_s = run.now()

    def _terminate(self, run: RunState, t: RequestTrack, cancelled: bool) -> None:
        """``_do_terminate_request``: ``request_finished`` (``True`` pins the blocks until the save is
        reported), then the blocks are released."""
        t.done, t.cancelled, t.finish_s, t.pending = True, cancelled, run.now(), None
        if t in run.active:
            run.active.remove(t)
        else:
            run.waiting.remove(t)
        request = t.request
        saving = False
        if t.allocated:
            block_ids = self.kv_manager.get_cache_indices(t.rid)
            if self.connector is not None:
                saving = self.connector.request_finished(request, block_ids)
            self.kv_manager.release(t.rid, request.get_tokens(0), t.kv_len, self._priority_of(request), pin=saving)
            run.tally.finished_allocated += 1
        if saving:
            self._in_transmission[t.rid] = t
            run.tally.async_saves += 1
        else:
            request.state = LlmRequestState.GENERATION_COMPLETE
        if run.on_finish is not None:
            self._submit(run, run.on_finish(t.index, t.result()))

    def _submit(self, run: RunState, specs: Iterable[RequestSpec]) -> None:
        """Requests created during the run join it with the next indices, in arrival order."""
        for spec in specs:
            t = self._track(len(run.tracks), spec)
            run.tracks.append(t)
            run.by_id[t.rid] = t
            bisect.insort(run.arrivals, t, key=_arrival_order)

    def _terminate_finished_transfers(self, run: RunState) -> bool:
        """``_kv_connector_terminate_requests``: one ``get_finished`` poll; unpin what every rank saved.

        TensorRT-LLM 1.2 unpins the first such request and leaves the loop (``break``): the others
        it was handed stay pinned. 1.3 unpins them all.
        """
        assert self.connector is not None
        saved = self.connector.get_finished()
        for request in saved:
            t = self._in_transmission.pop(request.request_id, None)
            if t is None:
                continue
            self.kv_manager.unpin(t.rid)
            t.request.state = LlmRequestState.GENERATION_COMPLETE
            if self.config.trtllm == "1.2":
                break
        loaded = False
        finished_loading = self.connector.finished_async_loading
        for t in run.active:
            if t.async_load and t.rid in finished_loading and t.kv_len < t.reused + t.external:
                t.kv_len = t.reused + t.external  # its load completed on every rank
                loaded = True
        return bool(saved) or loaded

    def _check_call_counts(self, before: CallCounts, after: CallCounts, tally: RunTally) -> None:
        """A self-check: the connector calls of this run are the ones TRT-LLM makes for the same run."""
        scheduler, worker = tally.expected_calls(self.model.shape.num_layers, self.config.enable_block_reuse)
        checks = [("scheduler", before.scheduler, after.scheduler, scheduler)]
        for rank, (b, a) in enumerate(zip(before.workers, after.workers, strict=True)):
            checks.append((f"rank {rank} worker", b, a, worker))
        for who, b, a, expected in checks:
            for method, count in expected.items():
                got = a.get(method, 0) - b.get(method, 0)
                if got != count:
                    raise ContractViolation(
                        method, f"{who}: called {got} times in this run; TRT-LLM calls it {count} times"
                    )
