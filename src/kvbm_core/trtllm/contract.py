"""Local stand-ins for TensorRT-LLM's connector base classes, used only where TRT-LLM is absent.

Names, signatures, dataclass field order and defaults follow the 1.2.x contract
(``tensorrt_llm._torch.pyexecutor.kv_cache_connector``) so the connector, the reference executor
and the tests run on machines that cannot install TRT-LLM. Written from the documented contract;
no TRT-LLM code is copied.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch


@dataclass
class RequestData:
    """One scheduled request in one iteration: the deltas since its last report."""

    request_id: int
    new_tokens: List[int]
    new_block_ids: List[int]
    computed_position: int
    num_scheduled_tokens: int


@dataclass
class SchedulerOutput:
    """A request appears in ``new_requests`` once (its first built output), then in ``cached_requests``."""

    new_requests: List[RequestData] = field(default_factory=list)
    cached_requests: List[RequestData] = field(default_factory=list)


class KvCacheConnectorWorker(ABC):
    """Runs on every rank; moves bytes in and out of the rank's KV pool."""

    def __init__(self, llm_args: Any):
        self._llm_args = llm_args
        self._metadata = None
        super().__init__()

    def bind_connector_meta(self, metadata: object) -> None:
        self._metadata = metadata

    def get_connector_meta(self) -> object:
        return self._metadata

    def _clear_connector_meta(self) -> None:
        self._metadata = None

    def register_forward_pass_callable(self) -> Optional[Callable[[], None]]:
        return None

    @abstractmethod
    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None: ...

    @abstractmethod
    def start_load_kv(self, stream: torch.cuda.Stream) -> None: ...

    @abstractmethod
    def wait_for_layer_load(self, layer_idx: int, stream: torch.cuda.Stream) -> None: ...

    @abstractmethod
    def save_kv_layer(self, layer_idx: int, stream: torch.cuda.Stream) -> None: ...

    @abstractmethod
    def wait_for_save(self, stream: torch.cuda.Stream) -> None: ...

    @abstractmethod
    def get_finished(
        self, finished_gen_req_ids: List[int], started_loading_req_ids: List[int]
    ) -> Tuple[List[int], List[int]]: ...


class KvCacheConnectorScheduler(ABC):
    """Runs on rank 0 only (the leader); decides what to load and save."""

    def __init__(self, llm_args: Any):
        self._llm_args = llm_args
        super().__init__()

    @abstractmethod
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> object: ...

    @abstractmethod
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> Tuple[int, bool]: ...

    @abstractmethod
    def request_finished(self, request: Any, cache_block_ids: List[int]) -> bool: ...

    @abstractmethod
    def update_state_after_alloc(self, request: Any, block_ids: List[int]) -> None: ...
