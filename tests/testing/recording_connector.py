"""A small but real connector for testing the reference executor, playing the role of TRT-LLM's MagicMock harness.

It records every call with its arguments, returns configurable matches, and can keep whole KV blocks
in an in-memory store keyed by (rank, cache salt, the whole token prefix): saves happen in
``wait_for_save`` after the forward pass, loads in ``start_load_kv`` (synchronous) or when
``get_finished`` reports them (asynchronous). ``finish_delay`` and ``lag`` (on ``lag_rank``) set how
many polls ``get_finished`` takes before it returns an id.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvbm_core.trtllm import KvCacheConnectorScheduler, KvCacheConnectorWorker, SchedulerOutput

Match = Callable[[Any, int], tuple[int, bool]]  # (request, num_computed_tokens) -> (tokens, async)


@dataclass
class Options:
    match: Match | None = None  # fixed answer; None: match the store
    async_load: bool = False  # store matches are loaded asynchronously
    async_save: bool = False  # request_finished returns True
    finish_delay: int = 0  # polls before get_finished returns an id (0: the poll that hands it in)
    lag: int = 0
    lag_rank: int = 1
    use_forward_pass_callable: bool = False
    drop_loads: bool = False  # promise loads but never copy the bytes (a broken connector)


@dataclass
class Shared:
    """What one connector's scheduler and workers share with the test."""

    options: Options
    calls: list[tuple[str, int | None, tuple]] = field(default_factory=list)  # (method, rank or None, args)
    store: dict[tuple, torch.Tensor] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, method: str, rank: int | None, *args: Any) -> None:
        with self.lock:
            self.calls.append((method, rank, copy.deepcopy(args)))

    def args(self, method: str, rank: int | None = None) -> list[tuple]:
        return [a for m, r, a in self.calls if m == method and r == rank]

    def count(self, method: str, rank: int | None = None) -> int:
        return len(self.args(method, rank))

    def outputs(self) -> list[SchedulerOutput]:
        return [a[0] for a in self.args("build_connector_meta")]


@dataclass
class Meta:
    loads: list[tuple[tuple, int, int | None]]  # (key, block id, request id if asynchronous)
    saves: list[tuple[tuple, int]]


@dataclass
class _Req:
    prompt_len: int
    salt: int | None  # the request's cache_salt_id
    alloc_blocks: list[int] = field(default_factory=list)  # from update_state_after_alloc
    tokens: list[int] = field(default_factory=list)  # as reported in scheduler outputs
    blocks: list[int] = field(default_factory=list)
    reported: bool = False
    saved: int = 0  # blocks [0, saved) are saved or known to be in the store
    loads: list[tuple] = field(default_factory=list)  # keys to load into blocks from `first_load`
    first_load: int = 0
    sync_tokens: int = 0  # promised synchronously: left out of the first computed_position
    async_load: bool = False


def make_connector(options: Options | None = None) -> tuple[type, type, Shared]:
    """Fresh (scheduler class, worker class) bound to one :class:`Shared` state."""
    shared = Shared(options or Options())

    class Scheduler(RecordingScheduler):
        pass

    class Worker(RecordingWorker):
        pass

    Scheduler.shared = Worker.shared = shared
    return Scheduler, Worker, shared


def _key(salt: str | None, tokens: list[int], end: int) -> tuple:
    return (salt, tuple(tokens[:end]))


class RecordingScheduler(KvCacheConnectorScheduler):
    shared: Shared

    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        self.shared.record("__init__", None)
        self.tpb = llm_args.kv_cache_config.tokens_per_block
        self.reqs: dict[int, _Req] = {}

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        self.shared.record("get_num_new_matched_tokens", None, request.request_id, num_computed_tokens)
        opts = self.shared.options
        st = self.reqs[request.request_id] = _Req(request.prompt_len, request.cache_salt_id)
        if opts.match is not None:
            answer = opts.match(request, num_computed_tokens)  # returned as is, even when malformed
            if isinstance(answer, tuple) and len(answer) == 2 and answer[1] is False:
                st.sync_tokens = answer[0]
            return answer
        tpb, tokens = self.tpb, request.get_tokens(0)
        first = num_computed_tokens // tpb
        i = first
        while (i + 1) * tpb < request.prompt_len and (0, *_key(st.salt, tokens, (i + 1) * tpb)) in self.shared.store:
            st.loads.append(_key(st.salt, tokens, (i + 1) * tpb))
            i += 1
        st.first_load = first
        st.async_load = bool(st.loads) and opts.async_load
        n = len(st.loads) * tpb
        st.sync_tokens = 0 if st.async_load else n
        return n, st.async_load

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        self.shared.record(
            "update_state_after_alloc", None, request.request_id, block_ids, request.context_current_position
        )
        st = self.reqs.setdefault(request.request_id, _Req(request.prompt_len, request.cache_salt_id))
        st.alloc_blocks = list(block_ids)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> Meta:
        self.shared.record("build_connector_meta", None, scheduler_output)
        meta = Meta(loads=[], saves=[])
        for rid, st in self.reqs.items():
            for j, key in enumerate(st.loads):
                meta.loads.append((key, st.alloc_blocks[st.first_load + j], rid if st.async_load else None))
            st.loads = []
        for data in [*scheduler_output.new_requests, *scheduler_output.cached_requests]:
            st = self.reqs[data.request_id]
            st.tokens.extend(data.new_tokens)
            st.blocks.extend(data.new_block_ids)
            end = data.computed_position + data.num_scheduled_tokens
            if not st.reported:
                end += st.sync_tokens
                st.reported = True
            full = min(end, len(st.tokens)) // self.tpb
            for i in range(st.saved, full):
                key = _key(st.salt, st.tokens, (i + 1) * self.tpb)
                if (0, *key) not in self.shared.store:
                    meta.saves.append((key, st.blocks[i]))
            st.saved = max(st.saved, full)
        return meta

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        self.shared.record("request_finished", None, request.request_id, cache_block_ids)
        self.reqs.pop(request.request_id, None)
        return self.shared.options.async_save


class RecordingWorker(KvCacheConnectorWorker):
    shared: Shared

    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        self.rank = llm_args.parallel_config.to_mapping().rank
        self.shared.record("__init__", self.rank, self.rank)
        self.pool: torch.Tensor | None = None
        self.waiting: dict[tuple[str, int], int] = {}  # (kind, id) -> polls left
        self.async_loads: dict[int, list[tuple[tuple, int]]] = {}

    def register_forward_pass_callable(self) -> Callable[[], None] | None:
        if not self.shared.options.use_forward_pass_callable:
            return None
        return lambda: self.shared.record("forward_pass_callable", self.rank)

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        self.shared.record("register_kv_caches", self.rank, tuple(kv_cache_tensor.shape))
        self.pool = kv_cache_tensor

    def bind_connector_meta(self, metadata: object) -> None:
        self.shared.record("bind_connector_meta", self.rank)
        super().bind_connector_meta(metadata)

    def start_load_kv(self, stream: Any) -> None:
        self.shared.record("start_load_kv", self.rank, type(stream).__name__)
        meta: Meta = self._metadata
        for key, block, rid in meta.loads:
            if rid is None:
                self._load(key, block)
            else:
                self.async_loads.setdefault(rid, []).append((key, block))

    def _load(self, key: tuple, block: int) -> None:
        if not self.shared.options.drop_loads:
            self.pool[block].copy_(self.shared.store[(self.rank, *key)])

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        self.shared.record("wait_for_layer_load", self.rank, layer_idx)

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        self.shared.record("save_kv_layer", self.rank, layer_idx)

    def wait_for_save(self, stream: Any) -> None:
        self.shared.record("wait_for_save", self.rank)
        for key, block in self._metadata.saves:
            self.shared.store[(self.rank, *key)] = self.pool[block].clone()

    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        self.shared.record("get_finished", self.rank, finished_gen_req_ids, started_loading_req_ids)
        opts = self.shared.options
        delay = opts.finish_delay + (opts.lag if self.rank == opts.lag_rank else 0)
        for kind, ids in (("save", finished_gen_req_ids), ("load", started_loading_req_ids)):
            for rid in ids:
                self.waiting[(kind, rid)] = delay
        saved, loaded = [], []
        for (kind, rid), left in list(self.waiting.items()):
            if left > 0:
                self.waiting[(kind, rid)] = left - 1
                continue
            del self.waiting[(kind, rid)]
            if kind == "save":
                saved.append(rid)
            else:
                for key, block in self.async_loads.pop(rid, []):
                    self._load(key, block)
                loaded.append(rid)
        return saved, loaded
