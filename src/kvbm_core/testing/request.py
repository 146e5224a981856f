"""Requests: what a test submits (:class:`RequestSpec`) and what a connector sees (:class:`LlmRequest`).

TensorRT-LLM hands a connector two kinds of request object, and kvbm must read both:

- the Python ``LlmRequest`` (``tensorrt_llm._torch.pyexecutor.llm_request``), passed to
  ``update_state_after_alloc``, ``build_connector_meta`` (through the manager) and
  ``request_finished``: here :class:`LlmRequest` (1.2) and :class:`LlmRequestV13` (1.3+, which adds
  the ``cache_salt`` string). ``is_generation_only_request`` is a *method* on it.
- the C++ binding, passed to ``get_num_new_matched_tokens`` (it is called back from C++): here
  :class:`BindingRequest`, a view with only the binding's attributes. ``is_generation_only_request``
  is a *property* there, and the cache salt is only ``cache_salt_id`` (an integer derived from the
  salt string), on both lines.

The executor mutates the Python object as TRT-LLM's runtime would. Retention priorities follow
TRT-LLM's ``KvCacheRetentionConfig`` (0-100, default 35).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash

DEFAULT_RETENTION_PRIORITY = 35


class LlmRequestState(enum.Enum):
    CONTEXT_INIT = "context_init"
    GENERATION_IN_PROGRESS = "generation_in_progress"
    GENERATION_COMPLETE = "generation_complete"
    DISAGG_GENERATION_TRANS_IN_PROGRESS = "disagg_generation_trans_in_progress"  # parked: async onboard
    DISAGG_CONTEXT_TRANS_IN_PROGRESS = "disagg_context_trans_in_progress"  # finished: async save


def cache_salt_id(salt: str) -> int:
    """The integer id the runtime derives from a request's cache salt string (64 bits).

    TRT-LLM hashes the salt's UTF-8 bytes to 8 bytes; any stable 64-bit digest plays that role here.
    """
    return xxhash.xxh3_64_intdigest(salt.encode("utf-8"))


@dataclass(frozen=True)
class TokenRangeRetentionConfig:
    token_start: int
    token_end: int | None  # exclusive; None runs to the end of the prompt
    priority: int
    duration_ms: int | None = None


@dataclass(frozen=True)
class KvCacheRetentionConfig:
    token_range_retention_configs: tuple[TokenRangeRetentionConfig, ...] = ()
    decode_retention_priority: int = DEFAULT_RETENTION_PRIORITY
    decode_duration_ms: int | None = None

    def block_priority(self, block_index: int, tokens_per_block: int, prompt_len: int) -> int:
        """Priority of the block starting at token ``block_index * tokens_per_block``."""
        first = block_index * tokens_per_block
        if first >= prompt_len:
            return self.decode_retention_priority
        for r in self.token_range_retention_configs:
            if r.token_start <= first and (r.token_end is None or first < r.token_end):
                return r.priority
        return DEFAULT_RETENTION_PRIORITY


@dataclass(frozen=True)
class RequestSpec:
    """One request to run. Arrival is by executor iteration or by wall time after the run starts.

    ``cancel_after_tokens``: cancel the request at the first point where it has generated at least
    that many tokens (0: as soon as it holds KV blocks; an asynchronously loading request is then
    finished without ever running a forward pass). ``generation_only`` marks a disaggregated
    generation request (its KV arrives from a context server in TensorRT-LLM).
    """

    prompt: Sequence[int]
    max_new_tokens: int
    arrival_step: int = 0
    arrival_time_s: float | None = None
    cache_salt: str | None = None
    retention: KvCacheRetentionConfig | None = None
    cancel_after_tokens: int | None = None
    lora_task_id: int | None = None
    generation_only: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))
        if not self.prompt:
            raise ValueError("RequestSpec.prompt must hold at least one token")
        if self.max_new_tokens < 1:
            raise ValueError(f"RequestSpec.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(eq=False)
class LlmRequest:
    """TRT-LLM 1.2's Python ``LlmRequest`` as connectors see it (beam 0 only)."""

    request_id: int
    prompt_len: int
    max_new_tokens: int
    cache_salt_id: int | None = None
    lora_task_id: int | None = None
    kv_cache_retention_config: KvCacheRetentionConfig | None = None
    state: LlmRequestState = LlmRequestState.CONTEXT_INIT
    context_current_position: int = 0
    context_chunk_size: int = 0
    prepopulated_prompt_len: int = 0
    multimodal_positions: list[int] | None = None
    generation_only: bool = field(default=False, repr=False)
    _tokens: list[int] = field(default_factory=list, repr=False)

    @property
    def py_request_id(self) -> int:
        return self.request_id

    @property
    def py_max_new_tokens(self) -> int:
        return self.max_new_tokens

    def is_generation_only_request(self) -> bool:
        """A method on the Python request (the binding's property is shadowed by it)."""
        return self.generation_only

    @property
    def context_remaining_length(self) -> int:
        return self.prompt_len - self.context_current_position

    @property
    def is_context_init_state(self) -> bool:
        return self.state is LlmRequestState.CONTEXT_INIT

    @property
    def is_last_context_chunk(self) -> bool:
        return self.context_current_position + self.context_chunk_size >= self.prompt_len

    def get_tokens(self, beam: int = 0) -> list[int]:
        """All tokens of beam 0 that the runtime has appended so far (prompt, then generated)."""
        if beam != 0:
            raise IndexError(f"beam {beam}: the reference executor runs beam width 1")
        return list(self._tokens)

    def get_num_tokens(self, beam: int = 0) -> int:
        if beam != 0:
            raise IndexError(f"beam {beam}: the reference executor runs beam width 1")
        return len(self._tokens)

    def block_priority(self, block_index: int, tokens_per_block: int) -> int:
        cfg = self.kv_cache_retention_config
        if cfg is None:
            return DEFAULT_RETENTION_PRIORITY
        return cfg.block_priority(block_index, tokens_per_block, self.prompt_len)


@dataclass(eq=False)
class LlmRequestV13(LlmRequest):
    """TRT-LLM 1.3+'s Python ``LlmRequest``: it also keeps the cache salt string."""

    cache_salt: str | None = None


class BindingRequest:
    """The C++ ``LlmRequest`` binding as ``get_num_new_matched_tokens`` receives it.

    A read-only view of the Python request limited to what the binding exposes; TRT-LLM's Python
    fields (``py_*``, the 1.3 ``cache_salt`` string) are not there.
    """

    __slots__ = ("_request",)

    def __init__(self, request: LlmRequest) -> None:
        self._request = request

    @property
    def request_id(self) -> int:
        return self._request.request_id

    @property
    def prompt_len(self) -> int:
        return self._request.prompt_len

    @property
    def is_generation_only_request(self) -> bool:
        return self._request.generation_only

    @property
    def cache_salt_id(self) -> int | None:
        return self._request.cache_salt_id

    @property
    def lora_task_id(self) -> int | None:
        return self._request.lora_task_id

    @property
    def multimodal_positions(self) -> list[int] | None:
        return self._request.multimodal_positions

    @property
    def context_current_position(self) -> int:
        return self._request.context_current_position

    @property
    def state(self) -> LlmRequestState:
        return self._request.state

    def get_tokens(self, beam: int = 0) -> list[int]:
        return self._request.get_tokens(beam)

    def get_num_tokens(self, beam: int = 0) -> int:
        return self._request.get_num_tokens(beam)
