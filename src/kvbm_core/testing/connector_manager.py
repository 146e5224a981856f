"""Drives one connector the way TRT-LLM's ``KvCacheConnectorManager`` does, over simulated TP ranks.

It owns every call into the connector and the state TRT-LLM keeps around those calls:

- construction: per rank a 2-thread pool builds the worker (and, on rank 0, the scheduler)
  concurrently, all ranks at once; each gets its rank's ``llm_args`` (:func:`rank_view`);
- the ``SchedulerOutput`` deltas: per request, the block ids and tokens already reported; the
  connector-promised tokens subtracted from the first ``computed_position`` of a synchronous load;
  asynchronously loading requests left out until their load completes;
- metadata: built on the leader, pickled once and unpickled for every rank (the MPI broadcast);
- async requests: ids handed to ``get_finished`` exactly once, then remembered per rank until that
  rank returns them; an id is acted on once every rank has returned it.

It checks what a connector controls and raises :class:`ContractViolation` when it breaks the
contract. Ranks are driven one after another in rank order within each step.
"""

from __future__ import annotations

import operator
import pickle
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kvbm_core.errors import KvbmLoadError
from kvbm_core.testing.errors import ContractViolation
from kvbm_core.testing.llm_args import TorchLlmArgs, rank_view
from kvbm_core.testing.request import LlmRequest, LlmRequestState
from kvbm_core.trtllm import KvCacheConnectorScheduler, KvCacheConnectorWorker, RequestData, SchedulerOutput

Stream = Any  # torch.cuda.Stream on a GPU, torch.cpu.Stream on CPU


@dataclass(frozen=True)
class CallCounts:
    """How often each connector method has been called since construction."""

    scheduler: dict[str, int]
    workers: tuple[dict[str, int], ...]  # one per rank

    def worker(self, method: str, rank: int = 0) -> int:
        return self.workers[rank].get(method, 0)


@dataclass
class _Reported:
    blocks: int = 0
    tokens: int = 0


class _RankAsync:
    """Ids one rank's worker has been handed and not returned, and ids it returned that others have not."""

    def __init__(self) -> None:
        self.pending_saving: set[int] = set()
        self.pending_loading: set[int] = set()
        self.done_saving: set[int] = set()
        self.done_loading: set[int] = set()


class ConnectorManager:
    def __init__(self, scheduler_cls: type, worker_cls: type, llm_args: TorchLlmArgs, era: str):
        self.llm_args = llm_args
        self.era = era
        self.tp_size = llm_args.tensor_parallel_size
        self.tokens_per_block = llm_args.kv_cache_config.tokens_per_block
        self.rank_args = [rank_view(llm_args, r) for r in range(self.tp_size)]
        self._scheduler_calls: Counter[str] = Counter()
        self._worker_calls: list[Counter[str]] = [Counter() for _ in range(self.tp_size)]
        self.scheduler, self.workers = self._construct(scheduler_cls, worker_cls)
        self.forward_pass_callables: list[Callable[[], Any] | None] = []
        for rank, worker in enumerate(self.workers):
            self._worker_calls[rank]["register_forward_pass_callable"] += 1
            fn = worker.register_forward_pass_callable()
            if fn is not None and not callable(fn):
                raise ContractViolation(
                    "register_forward_pass_callable",
                    f"rank {rank} returned {type(fn).__name__}, not a callable or None",
                )
            self.forward_pass_callables.append(fn)
        self._reported: dict[int, _Reported] = {}
        self._external_loads: dict[int, int] = {}
        self._scheduler_output: SchedulerOutput | None = None
        self._new_saving: list[int] = []
        self._new_loading: list[int] = []
        self._failed_loads: set[int] = set()
        self._ranks = [_RankAsync() for _ in range(self.tp_size)]

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
        return scheduler, workers

    def register_kv_caches(self, tensors: Sequence[Any]) -> None:
        for rank, (worker, tensor) in enumerate(zip(self.workers, tensors, strict=True)):
            self._worker_calls[rank]["register_kv_caches"] += 1
            worker.register_kv_caches(tensor)

    def wait_for_initialization(self) -> None:
        """[main] called after registration when the scheduler defines it."""
        hook = getattr(self.scheduler, "wait_for_initialization", None)
        if hook is not None:
            self._scheduler_calls["wait_for_initialization"] += 1
            hook()

    def calls(self) -> CallCounts:
        return CallCounts(dict(self._scheduler_calls), tuple(dict(c) for c in self._worker_calls))

    # -- allocation time ----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: LlmRequest, num_computed_tokens: int) -> int:
        if request.is_generation_only_request:
            raise RuntimeError("Connector API is not supported for generation-only requests!")
        self._scheduler_calls["get_num_new_matched_tokens"] += 1
        result = self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
        call = "get_num_new_matched_tokens"
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise ContractViolation(call, f"must return (num_tokens, load_async), got {result!r}")
        num_tokens, load_async = self._broadcast(call, tuple(result))
        num_tokens = _as_int(num_tokens)
        if num_tokens is None or num_tokens < 0:
            raise ContractViolation(call, f"num_tokens must be an int >= 0, got {result[0]!r}")
        if not isinstance(load_async, bool):
            raise ContractViolation(call, f"load_async must be a bool, got {load_async!r}")
        if num_tokens == 0 and load_async:
            raise ContractViolation(call, "load_kv_async must be False when num_tokens is 0!")
        if load_async:
            self._new_loading.append(request.request_id)
        self._external_loads[request.request_id] = num_tokens
        return num_tokens

    def is_loading_async(self, request_id: int) -> bool:
        return request_id in self._new_loading

    def update_state_after_alloc(self, request: LlmRequest, block_ids: list[int]) -> None:
        self._scheduler_calls["update_state_after_alloc"] += 1
        self.scheduler.update_state_after_alloc(request, list(block_ids))

    # -- one scheduled iteration --------------------------------------------------------------

    def build_scheduler_output(
        self, context: Sequence[tuple[LlmRequest, list[int]]], generation: Sequence[tuple[LlmRequest, list[int]]]
    ) -> None:
        out = SchedulerOutput()
        for request, block_ids in context:
            rid = request.request_id
            if rid in self._new_loading:
                continue
            is_new = rid not in self._reported
            data = self._request_data(request, block_ids, is_context=True)
            if rid in self._external_loads:
                data.computed_position -= self._external_loads[rid]
            (out.new_requests if is_new else out.cached_requests).append(data)
        for request, block_ids in generation:
            out.cached_requests.append(self._request_data(request, block_ids, is_context=False))
        self._external_loads.clear()
        self._scheduler_output = out

    def _request_data(self, request: LlmRequest, block_ids: list[int], is_context: bool) -> RequestData:
        rep = self._reported.setdefault(request.request_id, _Reported())
        tokens = request.get_tokens(0)
        first_block = rep.blocks
        new_block_ids = list(block_ids[rep.blocks :])
        new_tokens = tokens[rep.tokens :]
        rep.blocks, rep.tokens = len(block_ids), len(tokens)
        if is_context:
            computed = request.context_current_position
            scheduled = min(request.context_remaining_length, request.context_chunk_size)
        else:
            computed = len(tokens) - 1
            scheduled = 1
        data = RequestData(request.request_id, new_tokens, new_block_ids, computed, scheduled)
        if self.era == "main":
            tpb = self.tokens_per_block
            data.priorities = [request.block_priority(first_block + i, tpb) for i in range(len(new_block_ids))]
            data.cache_salt = request.cache_salt
        return data

    def take_scheduled_requests_pending_load(self, context: Sequence[LlmRequest]) -> set[int]:
        """Park the requests whose load is asynchronous; their ids."""
        parked = {r.request_id for r in context if r.request_id in self._new_loading}
        for request in context:
            if request.request_id in parked:
                request.state = LlmRequestState.DISAGG_GENERATION_TRANS_IN_PROGRESS
        return parked

    def handle_metadata(self) -> None:
        self._scheduler_calls["build_connector_meta"] += 1
        metadata = self.scheduler.build_connector_meta(self._scheduler_output)
        self._scheduler_output = None
        try:
            blob = pickle.dumps(metadata)
        except Exception as exc:
            raise ContractViolation(
                "build_connector_meta",
                f"metadata of type {type(metadata).__name__} is not picklable (TRT-LLM broadcasts it): {exc}",
            ) from exc
        for rank, worker in enumerate(self.workers):
            copy = pickle.loads(blob)
            self._worker_calls[rank]["bind_connector_meta"] += 1
            worker.bind_connector_meta(copy)
            if worker._metadata is not copy:
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
        self._scheduler_calls["request_finished"] += 1
        result = self.scheduler.request_finished(request, list(block_ids))
        if not isinstance(result, bool):
            raise ContractViolation("request_finished", f"must return a bool, got {result!r}")
        saving_async = self._broadcast("request_finished", result)
        self._reported.pop(request.request_id, None)
        if saving_async:
            self._new_saving.append(request.request_id)
            request.state = LlmRequestState.DISAGG_CONTEXT_TRANS_IN_PROGRESS
        return saving_async

    def get_finished(self) -> tuple[list[int], list[int], dict[int, str]]:
        """One poll of every rank: the (saved, loaded) ids that every rank has now reported, and the
        requests whose asynchronous load a rank reported as failed (id -> message).

        A worker reports failed loads by raising :class:`~kvbm_core.errors.KvbmLoadError`, which names
        the requests. TRT-LLM 1.2 has no per-request path for that: the exception reaches its
        executor loop, which ends every active request with the error. The reference executor ends
        only the named requests (what an engine with a load-failure API does) and keeps serving.
        """
        saving, loading = self._new_saving, self._new_loading
        self._new_saving, self._new_loading = [], []
        failed: dict[int, str] = {}
        for rank, (worker, state) in enumerate(zip(self.workers, self._ranks, strict=False)):
            state.pending_saving.update(saving)
            state.pending_loading.update(loading)
            self._worker_calls[rank]["get_finished"] += 1
            try:
                result = worker.get_finished(list(saving), list(loading))
            except KvbmLoadError as exc:
                failed.update((int(rid), str(exc)) for rid in exc.request_ids)
                continue
            saved, loaded = self._check_finished(rank, result)
            loaded = [rid for rid in loaded if rid not in self._failed_loads]  # other ranks catch up later
            for ids, pending, done, kind in (
                (saved, state.pending_saving, state.done_saving, "finished_saving"),
                (loaded, state.pending_loading, state.done_loading, "finished_loading"),
            ):
                for rid in ids:
                    if rid not in pending:
                        raise ContractViolation(
                            "get_finished",
                            f"rank {rank} returned {rid} in {kind}, which was not handed in or was already returned",
                        )
                    pending.discard(rid)
                    done.add(rid)
        self._failed_loads.update(failed)
        for state in self._ranks:
            state.pending_loading.difference_update(failed)
            state.done_loading.difference_update(failed)
        all_saved = set.intersection(*(s.done_saving for s in self._ranks))
        all_loaded = set.intersection(*(s.done_loading for s in self._ranks))
        for state in self._ranks:
            state.done_saving -= all_saved
            state.done_loading -= all_loaded
        return sorted(all_saved), sorted(all_loaded), failed

    def outstanding(self) -> tuple[set[int], set[int]]:
        """Ids handed to (or awaiting) get_finished that not every rank has returned yet."""
        saving = set(self._new_saving).union(*(s.pending_saving | s.done_saving for s in self._ranks))
        loading = set(self._new_loading).union(*(s.pending_loading | s.done_loading for s in self._ranks))
        return saving, loading

    @staticmethod
    def _check_finished(rank: int, result: Any) -> tuple[list[int], list[int]]:
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise ContractViolation(
                "get_finished", f"rank {rank} must return (finished_saving, finished_loading), got {result!r}"
            )
        out = []
        for given in result:
            ids = [_as_int(i) for i in given]
            if None in ids or len(set(ids)) != len(ids):
                raise ContractViolation(
                    "get_finished", f"rank {rank} returned {given!r}: expected distinct request ids"
                )
            out.append(ids)
        return out[0], out[1]

    @staticmethod
    def _broadcast(call: str, value: Any) -> Any:
        """What the other ranks receive from the leader's MPI broadcast."""
        try:
            return pickle.loads(pickle.dumps(value))
        except Exception as exc:
            raise ContractViolation(call, f"result {value!r} is not picklable: {exc}") from exc


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it is an integer other than a bool (numpy integers included)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
