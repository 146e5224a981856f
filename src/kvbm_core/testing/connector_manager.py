"""Drives one connector the way TRT-LLM's ``KvCacheConnectorManager`` does, over simulated TP ranks.

It owns every call into the connector and the state TRT-LLM keeps around those calls, per rank as
each MPI rank keeps its own manager:

- construction: per rank a 2-thread pool builds the worker (and, on rank 0, the scheduler)
  concurrently, all ranks at once; each gets its rank's ``llm_args`` (:func:`rank_view`);
- ``get_num_new_matched_tokens`` receives the C++ binding of the request
  (:class:`~kvbm_core.testing.request.BindingRequest`) and refuses generation-only requests; the
  other scheduler calls receive the Python request;
- the ``SchedulerOutput``: per request id, the block ids (``get_cache_indices``) and tokens already
  reported are kept for the life of the manager (as TRT-LLM keeps them), deltas are what is new;
  ``computed_position`` and ``num_scheduled_tokens`` follow the request's state; the tokens promised
  by ``get_num_new_matched_tokens`` are subtracted from the first report's ``computed_position``;
  requests whose load is asynchronous are left out until it completes;
- metadata: built on the leader, pickled once and unpickled for every rank (the MPI broadcast);
- async requests (``get_finished``): ids handed in exactly once; each rank's returned ids move from
  its pending to its locally finished set (an id it was never handed is a ``KeyError``, as in
  TRT-LLM); only ids every rank returned are acted on.

The 1.3 line builds :class:`~kvbm_core.testing.api_v13.RequestDataV13` (block hashes, priorities,
cache salt) and counts draft tokens in ``num_scheduled_tokens``.

TRT-LLM checks nothing else a connector returns. ``strict=True`` adds checks that name the method
a connector broke (:class:`ContractViolation`), for connector authors; the faithful default lets a
wrong return value fail as it would in TRT-LLM.
"""

from __future__ import annotations

import operator
import pickle
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from kvbm_core.testing.api_v13 import RequestDataV13, SchedulerOutputV13
from kvbm_core.testing.errors import ContractViolation
from kvbm_core.testing.llm_args import TorchLlmArgs, rank_view
from kvbm_core.testing.request import BindingRequest, LlmRequest, LlmRequestState
from kvbm_core.trtllm import KvCacheConnectorScheduler, KvCacheConnectorWorker, RequestData, SchedulerOutput

Stream = Any  # torch.cuda.Stream on a GPU, torch.cpu.Stream on CPU
TrtllmLine = Literal["1.2", "1.3"]
BlockHashes = Callable[[LlmRequest], list[int]]  # the KV manager's full-block hash chain of a request

_CONTEXT_STATES = (LlmRequestState.CONTEXT_INIT, LlmRequestState.DISAGG_GENERATION_TRANS_IN_PROGRESS)


@dataclass(frozen=True)
class CallCounts:
    """How often each connector method has been called since construction."""

    scheduler: dict[str, int]
    workers: tuple[dict[str, int], ...]  # one per rank

    def worker(self, method: str, rank: int = 0) -> int:
        return self.workers[rank].get(method, 0)


class _Reported:
    """Block ids and tokens of one request already in a scheduler output (kept for the manager's life)."""

    __slots__ = ("block_ids", "tokens")

    def __init__(self) -> None:
        self.block_ids = 0
        self.tokens = 0


class _AsyncRequests:
    """TRT-LLM's ``AsyncRequests``: requests saving or loading asynchronously, by id."""

    def __init__(self) -> None:
        self.saving: dict[int, LlmRequest] = {}
        self.loading: dict[int, LlmRequest] = {}

    def add_from(self, other: _AsyncRequests) -> None:
        self.saving.update(other.saving)
        self.loading.update(other.loading)
        other.saving, other.loading = {}, {}

    def extract_by_id(self, saving_ids: Sequence[int], loading_ids: Sequence[int]) -> _AsyncRequests:
        out = _AsyncRequests()
        for rid in saving_ids:
            out.saving[rid] = self.saving.pop(rid)  # an id never handed in: KeyError, as in TRT-LLM
        for rid in loading_ids:
            out.loading[rid] = self.loading.pop(rid)
        return out


class _RankState:
    """One rank's manager state between ``get_finished`` calls."""

    def __init__(self) -> None:
        self.pending = _AsyncRequests()  # handed to get_finished, not yet returned by this rank
        self.local_finished = _AsyncRequests()  # returned by this rank, not yet by every rank


class ConnectorManager:
    def __init__(self, scheduler_cls: type, worker_cls: type, llm_args: TorchLlmArgs, line: TrtllmLine,
                 *, strict: bool = False, block_hashes: BlockHashes | None = None):
        self.llm_args = llm_args
        self.line = line
        self.strict = strict
        self.tp_size = llm_args.tensor_parallel_size
        self.tokens_per_block = llm_args.kv_cache_config.tokens_per_block
        self.rank_args = [rank_view(llm_args, r) for r in range(self.tp_size)]
        self._block_hashes = block_hashes
        self._scheduler_calls: Counter[str] = Counter()
        self._worker_calls: list[Counter[str]] = [Counter() for _ in range(self.tp_size)]
        self.scheduler, self.workers = self._construct(scheduler_cls, worker_cls)
        self.forward_pass_callables: list[Callable[[], Any] | None] = []
        for rank, worker in enumerate(self.workers):
            self._worker_calls[rank]["register_forward_pass_callable"] += 1
            fn = worker.register_forward_pass_callable()
            if strict and fn is not None and not callable(fn):
                raise ContractViolation(
                    "register_forward_pass_callable",
                    f"rank {rank} returned {type(fn).__name__}, not a callable or None",
                )
            self.forward_pass_callables.append(fn or None)
        self._reported: dict[int, _Reported] = {}
        self._external_loads: dict[int, int] = {}
        self._scheduler_output: Any = None
        self.new_async = _AsyncRequests()  # not yet handed to get_finished
        self.finished_async_loading: dict[int, LlmRequest] = {}
        self._ranks = [_RankState() for _ in range(self.tp_size)]

    # -- construction -------------------------------------------------------------------------

    def _construct(self, scheduler_cls: type, worker_cls: type) -> tuple[Any, list[Any]]:
        pools = [
            ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"connector-rank{r}") for r in range(self.tp_size)
        ]
        try:
            worker_futures = [pool.submit(worker_cls, self.rank_args[r]) for r, pool in enumerate(pools)]
            scheduler_future: Future = pools[0].submit(scheduler_cls, self.llm_args)
            scheduler = scheduler_future.result()
            workers = [f.result() for f in worker_futures]
        finally:
            for pool in pools:
                pool.shutdown(wait=True)
        if self.strict:
            self._check_classes(scheduler_cls, worker_cls, scheduler, workers)
        return scheduler, workers

    def _check_classes(self, scheduler_cls: type, worker_cls: type, scheduler: Any, workers: list[Any]) -> None:
        if not isinstance(scheduler, KvCacheConnectorScheduler):
            raise ContractViolation(
                "scheduler class", f"{scheduler_cls.__qualname__} does not subclass KvCacheConnectorScheduler"
            )
        if getattr(scheduler, "_llm_args", None) is not self.llm_args:
            raise ContractViolation("KvCacheConnectorScheduler.__init__", "did not call super().__init__(llm_args)")
        for rank, worker in enumerate(workers):
            if not isinstance(worker, KvCacheConnectorWorker):
                raise ContractViolation(
                    "worker class", f"{worker_cls.__qualname__} does not subclass KvCacheConnectorWorker"
                )
            if getattr(worker, "_llm_args", None) is not self.rank_args[rank]:
                raise ContractViolation(
                    "KvCacheConnectorWorker.__init__", f"rank {rank} did not call super().__init__(llm_args)"
                )

    def register_kv_caches(self, tensors: Sequence[Any]) -> None:
        for rank, (worker, tensor) in enumerate(zip(self.workers, tensors, strict=True)):
            self._worker_calls[rank]["register_kv_caches"] += 1
            worker.register_kv_caches(tensor)

    def wait_for_initialization(self) -> None:
        """1.3: called after registration when the scheduler defines it."""
        hook = getattr(self.scheduler, "wait_for_initialization", None)
        if hook is not None:
            self._scheduler_calls["wait_for_initialization"] += 1
            hook()

    def calls(self) -> CallCounts:
        return CallCounts(dict(self._scheduler_calls), tuple(dict(c) for c in self._worker_calls))

    # -- allocation time ----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: LlmRequest, num_computed_tokens: int) -> int:
        """Called from C++ ``addSequence``: the connector sees the binding, not the Python request."""
        binding = BindingRequest(request)
        if binding.is_generation_only_request:
            raise RuntimeError("Connector API is not supported for generation-only requests!")
        self._scheduler_calls["get_num_new_matched_tokens"] += 1
        result = self.scheduler.get_num_new_matched_tokens(binding, num_computed_tokens)
        if self.strict:
            _check_match(result)
        num_tokens, load_async = self._broadcast(result)
        if num_tokens == 0 and load_async:
            raise RuntimeError("load_kv_async must be False when num_tokens is 0!")
        if load_async:
            self.new_async.loading[request.request_id] = request
        self._external_loads[request.request_id] = num_tokens
        return num_tokens

    def should_add_sequence(self, request: LlmRequest) -> bool:
        return request.request_id not in self.finished_async_loading

    def is_loading_async(self, request_id: int) -> bool:
        return request_id in self.new_async.loading

    def update_state_after_alloc(self, request: LlmRequest, block_ids: list[int]) -> None:
        self._scheduler_calls["update_state_after_alloc"] += 1
        self.scheduler.update_state_after_alloc(request, list(block_ids))

    # -- one scheduled iteration --------------------------------------------------------------

    def build_scheduler_output(self, context: Sequence[LlmRequest], generation: Sequence[LlmRequest],
                               cache_indices: Callable[[LlmRequest], list[int]]) -> None:
        """At the end of ``prepare_resources``: one ``RequestData`` per scheduled request."""
        out = SchedulerOutputV13() if self.line == "1.3" else SchedulerOutput()
        for request in context:
            rid = request.request_id
            if rid in self.new_async.loading:
                continue
            is_new = rid not in self._reported
            data = self._request_data(request, cache_indices(request))
            if rid in self._external_loads:
                data.computed_position -= self._external_loads[rid]
            (out.new_requests if is_new else out.cached_requests).append(data)
        for request in generation:
            out.cached_requests.append(self._request_data(request, cache_indices(request)))
        self._external_loads = {}
        self._scheduler_output = out

    def _request_data(self, request: LlmRequest, block_ids: list[int]) -> Any:
        reported = self._reported.setdefault(request.request_id, _Reported())
        tokens = request.get_tokens(0)
        first_new_block = reported.block_ids
        new_block_ids = list(block_ids[reported.block_ids :])
        new_tokens = tokens[reported.tokens :]
        reported.block_ids, reported.tokens = len(block_ids), len(tokens)
        if request.state in _CONTEXT_STATES:
            computed = request.context_current_position
            scheduled = min(request.context_remaining_length, request.context_chunk_size)
        else:
            computed = len(tokens) - 1
            scheduled = 1
        if self.line == "1.2":
            return RequestData(request.request_id, new_tokens, new_block_ids, computed, scheduled)
        tpb = self.tokens_per_block
        priorities = None
        if request.kv_cache_retention_config is not None:
            priorities = [request.block_priority(first_new_block + i, tpb) for i in range(len(new_block_ids))]
        return RequestDataV13(
            request.request_id, new_tokens, new_block_ids, computed, scheduled,
            block_hashes=self._block_hashes(request) if self._block_hashes is not None else [],
            priorities=priorities,
            cache_salt=getattr(request, "cache_salt", None),
        )

    def take_scheduled_requests_pending_load(self, context: Sequence[LlmRequest]) -> list[LlmRequest]:
        """Park the requests whose load is asynchronous; returns the context requests that stay."""
        allowed = []
        for request in context:
            if request.request_id in self.new_async.loading:
                request.state = LlmRequestState.DISAGG_GENERATION_TRANS_IN_PROGRESS
                self.new_async.loading[request.request_id] = request
            else:
                allowed.append(request)
        return allowed

    def handle_metadata(self) -> None:
        self._scheduler_calls["build_connector_meta"] += 1
        metadata = self.scheduler.build_connector_meta(self._scheduler_output)
        self._scheduler_output = None
        blob = self._pickled("build_connector_meta", metadata)
        for rank, worker in enumerate(self.workers):
            copy = pickle.loads(blob)
            self._worker_calls[rank]["bind_connector_meta"] += 1
            worker.bind_connector_meta(copy)
            if self.strict and worker._metadata is not copy:
                raise ContractViolation(
                    "bind_connector_meta", f"rank {rank}'s override did not call super().bind_connector_meta"
                )

    def start_load_kv(self, stream: Stream) -> None:
        self._each_worker("start_load_kv", stream)

    def wait_for_layer_load(self, layer_idx: int, stream: Stream) -> None:
        self._each_worker("wait_for_layer_load", layer_idx, stream)

    def save_kv_layer(self, layer_idx: int, stream: Stream) -> None:
        self._each_worker("save_kv_layer", layer_idx, stream)

    def forward_pass_done(self) -> None:
        """The end of a forward pass: every rank's registered callable, if any."""
        for rank, fn in enumerate(self.forward_pass_callables):
            if fn is not None:
                self._worker_calls[rank]["forward_pass_callable"] += 1
                fn()

    def wait_for_save(self, stream: Stream) -> None:
        self._each_worker("wait_for_save", stream)

    def _each_worker(self, method: str, *args: Any) -> None:
        for rank, worker in enumerate(self.workers):
            self._worker_calls[rank][method] += 1
            getattr(worker, method)(*args)

    # -- request end and async completion -----------------------------------------------------

    def request_finished(self, request: LlmRequest, block_ids: list[int]) -> bool:
        """The leader's answer: True when saving continues asynchronously."""
        self.finished_async_loading.pop(request.request_id, None)
        self._scheduler_calls["request_finished"] += 1
        result = self.scheduler.request_finished(request, list(block_ids))
        if self.strict and not isinstance(result, bool):
            raise ContractViolation("request_finished", f"must return a bool, got {result!r}")
        saving_async = bool(self._broadcast(result))
        if saving_async:
            self.new_async.saving[request.request_id] = request
            request.state = LlmRequestState.DISAGG_CONTEXT_TRANS_IN_PROGRESS
        return saving_async

    def get_finished(self) -> list[LlmRequest]:
        """One poll of every rank; returns the requests whose save every rank has now reported.

        Requests whose load every rank reported go back to ``CONTEXT_INIT`` to be scheduled again.
        """
        started_loading = list(self.new_async.loading)
        finished_gen = list(self.new_async.saving)
        handed = self.new_async
        self.new_async = _AsyncRequests()
        gathered: list[tuple[set[int], set[int]]] = []
        for rank, (worker, state) in enumerate(zip(self.workers, self._ranks, strict=True)):
            state.pending.saving.update(handed.saving)
            state.pending.loading.update(handed.loading)
            self._worker_calls[rank]["get_finished"] += 1
            result = worker.get_finished(list(finished_gen), list(started_loading))
            if self.strict:
                _check_finished(rank, result, state)
            saved, loaded = result
            state.local_finished.add_from(state.pending.extract_by_id(saved, loaded))
            gathered.append((set(state.local_finished.saving), set(state.local_finished.loading)))
        all_saved = set.intersection(*(g[0] for g in gathered))
        all_loaded = set.intersection(*(g[1] for g in gathered))
        done = _AsyncRequests()
        for state in self._ranks:
            done = state.local_finished.extract_by_id(sorted(all_saved), sorted(all_loaded))
        for rid, request in done.loading.items():
            request.state = LlmRequestState.CONTEXT_INIT
            self.finished_async_loading[rid] = request
        return list(done.saving.values())

    def outstanding(self) -> tuple[set[int], set[int]]:
        """Ids handed to (or awaiting) get_finished that not every rank has returned yet."""
        saving = set(self.new_async.saving).union(*(set(s.pending.saving) | set(s.local_finished.saving)
                                                     for s in self._ranks))
        loading = set(self.new_async.loading).union(*(set(s.pending.loading) | set(s.local_finished.loading)
                                                      for s in self._ranks))
        return saving, loading

    def _broadcast(self, value: Any) -> Any:
        """What the other ranks receive from the leader's MPI broadcast."""
        return pickle.loads(self._pickled("broadcast", value))

    def _pickled(self, call: str, value: Any) -> bytes:
        try:
            return pickle.dumps(value)
        except Exception as exc:
            if self.strict:
                raise ContractViolation(call, f"metadata of type {type(value).__name__} is not picklable "
                                              f"(TRT-LLM broadcasts it): {exc}") from exc
            raise


def _check_match(result: Any) -> None:
    call = "get_num_new_matched_tokens"
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise ContractViolation(call, f"must return (num_tokens, load_async), got {result!r}")
    num_tokens = _as_int(result[0])
    if num_tokens is None or num_tokens < 0:
        raise ContractViolation(call, f"num_tokens must be an int >= 0, got {result[0]!r}")
    if not isinstance(result[1], bool):
        raise ContractViolation(call, f"load_async must be a bool, got {result[1]!r}")


def _check_finished(rank: int, result: Any, state: _RankState) -> None:
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise ContractViolation(
            "get_finished", f"rank {rank} must return (finished_saving, finished_loading), got {result!r}"
        )
    for given, pending, kind in ((result[0], state.pending.saving, "finished_saving"),
                                 (result[1], state.pending.loading, "finished_loading")):
        ids = [_as_int(i) for i in given]
        if None in ids or len(set(ids)) != len(ids):
            raise ContractViolation("get_finished", f"rank {rank} returned {given!r}: expected distinct request ids")
        for rid in ids:
            if rid not in pending:
                raise ContractViolation(
                    "get_finished", f"rank {rank} returned {rid} in {kind}, which was not handed in or was already "
                                    "returned"
                )


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it is an integer other than a bool (numpy integers included)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
