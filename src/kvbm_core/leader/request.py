"""One request as the leader tracks it, from first sight to the last result of its operations.

Phases (allowed moves in :data:`ALLOWED`, checked by :meth:`RequestSlot.move`)::

    (new) ─match─> MATCHED ─allocated─> ALLOCATED ─next step─> ACTIVE ─finish─> FINISHED ─drained─> (forgotten)
    (new) ─allocated (no match)─> ALLOCATED           (new) ─first report (no match)─> ACTIVE
    MATCHED / ALLOCATED ─finish (cancelled before allocation or before any forward)─> FINISHED

- ``MATCHED``: ``match`` answered; the promised host slots are held (pinned).
- ``ALLOCATED``: the engine gave device blocks; promised blocks are paired with them and their load
  goes out in the next step.
- ``ACTIVE``: loads emitted and/or the engine scheduled the request; each step's newly full blocks
  become store candidates (an ``evaluated`` cursor that starts past the device-reused and onboarded
  blocks, so those are never stored again).
- ``FINISHED``: no new operations; the request is forgotten once every operation has a result.

The request owns its tokens and keys (:class:`~kvbm_core.identity.PrefixHasher`) and its Dynamo
sequence hashes (computed lazily, only for blocks it stores).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any

import numpy as np

from kvbm_core.errors import KvbmError
from kvbm_core.identity import DynamoSequenceChain, KeySpace, PrefixHasher


class RequestPhase(Enum):
    MATCHED = "matched"
    ALLOCATED = "allocated"
    ACTIVE = "active"
    FINISHED = "finished"


ALLOWED: dict[RequestPhase | None, frozenset[RequestPhase]] = {
    None: frozenset({RequestPhase.MATCHED, RequestPhase.ALLOCATED, RequestPhase.ACTIVE}),
    RequestPhase.MATCHED: frozenset({RequestPhase.ALLOCATED, RequestPhase.ACTIVE, RequestPhase.FINISHED}),
    RequestPhase.ALLOCATED: frozenset({RequestPhase.ACTIVE, RequestPhase.FINISHED}),
    RequestPhase.ACTIVE: frozenset({RequestPhase.FINISHED}),
    RequestPhase.FINISHED: frozenset(),
}


class RequestStateError(KvbmError):
    """The engine called the leader out of order for a request (for example a second ``allocated``)."""

    def __init__(self, request_id: int, message: str):
        self.request_id = request_id
        super().__init__(f"request {request_id}: {message}")


_NO_SLOTS = np.zeros(0, np.int64)


class RequestSlot:
    """The leader's record of one request (mutable; owned by the block manager)."""

    __slots__ = (
        "request_id", "phase", "hasher", "dynamo", "prompt", "device_blocks",
        "promised_slots", "host_hits", "disk_hits", "queried", "looked_up", "block_ids", "priorities",
        "evaluated", "offload_stopped", "reported", "ops", "pending", "pending_loads", "deferred",
        "failed", "loads_emitted",
    )

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self.phase: RequestPhase | None = None
        self.hasher: PrefixHasher | None = None
        self.dynamo: DynamoSequenceChain | None = None
        self.prompt: Sequence[int] | None = None
        self.device_blocks = 0
        self.promised_slots = _NO_SLOTS  # host slots, in prompt order
        self.host_hits = self.disk_hits = self.queried = 0
        self.looked_up = False
        self.block_ids: list[int] = []
        self.priorities: list[int] = []
        self.evaluated = 0
        self.offload_stopped = False
        self.reported = False  # seen in a scheduler output at least once
        self.ops: set[int] = set()  # every op ever planned for the request
        self.pending: set[int] = set()  # ops without a result yet
        self.pending_loads: set[int] = set()
        self.deferred: list[tuple[Any, Any]] = []  # store results waiting on this request's loads
        self.failed = False
        self.loads_emitted = False

    def move(self, phase: RequestPhase) -> None:
        if phase not in ALLOWED[self.phase]:
            current = self.phase.value if self.phase else "new"
            raise RequestStateError(self.request_id, f"cannot go from {current} to {phase.value}")
        self.phase = phase

    def start_hashing(self, space: KeySpace, tokens: Sequence[int] | np.ndarray, salt_hash: int) -> None:
        self.hasher = PrefixHasher(space, tokens)
        self.dynamo = DynamoSequenceChain(salt_hash, space.tokens_per_block)

    @property
    def num_promised(self) -> int:
        return len(self.promised_slots)

    @property
    def promise_end_block(self) -> int:
        """First block after the device-reused and promised ones."""
        return self.device_blocks + self.num_promised

    def seq_hash_bytes(self, start: int, stop: int) -> bytes:
        """Dynamo sequence hashes of blocks ``[start, stop)`` as native u64 bytes (for KV events)."""
        assert self.hasher is not None and self.dynamo is not None
        return self.dynamo.range_bytes(self.hasher.tokens, start, stop)
