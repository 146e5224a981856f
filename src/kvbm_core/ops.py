"""The leader <-> worker contract: tier levels, routes, one step's transfer operations
(:class:`StepOps`), what the workers report back (:class:`OpResult` with its request id,
:class:`TierReady`, :class:`StepTiming`), and the configuration the leader hands every worker
(:class:`WorkerConfig`: settings, :class:`TierAllocation` per tier, namespace, link address).

TRT-LLM pickles the connector metadata and broadcasts it to every rank each step, so a step is a
handful of flat numpy arrays rather than a list of objects. An operation moves a run of blocks along
one :class:`Route`; its blocks are ``src[offsets[i]:offsets[i+1]]`` -> ``dst[...]``, where device
sides are device block ids and tier sides are slot indices. ``keys`` carries each block's 128-bit
identity so that disk slots can be stamped on write and verified on read.

``fresh_blocks`` lists every device block id the engine handed out in this step (the
``new_block_ids`` of every request in the scheduler output). The engine may write those blocks in
this step's forward pass while an earlier store of this rank still reads them (kvbm never pins a
finished request's blocks: see :mod:`kvbm_core.trtllm.connector`), so each rank makes its compute
stream wait for its own operations on them first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from kvbm_core.link import LinkAddress
    from kvbm_core.settings.model import KvbmSettings, TierSpec


class TierLevel(IntEnum):
    """Where a tier sits below the GPU (G1): host memory (G2) or storage (G3)."""

    HOST = 2
    DISK = 3


class Route(IntEnum):
    """Where an operation moves bytes. ``LOADS`` run before the forward pass, ``STORES`` after it.

    A block on disk reaches the device through the host: it is staged (read, verified) into a host
    slot *before* it is promised to a request, so a promise never depends on bytes nobody has
    checked. Offload goes through the host too, except for blocks the host has no room for at the
    moment (every slot held or being written): those go straight to the disk.
    """

    D2H = 0  # offload: device block -> host slot (write-through)
    H2D = 1  # onboard: host slot -> device block
    H2DISK = 2  # host slot -> disk slot, in the background, behind the admission filter
    DISK2H = 3  # stage: disk slot -> host slot, verified, at once on every rank, before a promise
    D2DISK = 4  # offload: device block -> disk slot, for blocks the host has no room for

    @property
    def label(self) -> str:
        return self.name.lower()


LOADS = frozenset({Route.H2D})
DISK_ROUTES = frozenset({Route.H2DISK, Route.DISK2H, Route.D2DISK})  # what a failing disk device fails
STORES = frozenset({Route.D2H, Route.D2DISK})
BACKGROUND = frozenset({Route.H2DISK})
STAGING = frozenset({Route.DISK2H})
NO_REQUEST = -1


@dataclass(frozen=True)
class Op:
    """A view of one operation of a :class:`StepOps`."""

    op_id: int
    route: Route
    request_id: int
    src: np.ndarray
    dst: np.ndarray
    keys: np.ndarray

    @property
    def num_blocks(self) -> int:
        return int(self.src.shape[0])


@dataclass(frozen=True, eq=False)
class StepOps:
    """All operations the leader planned in one step, as flat arrays (see the module docstring).

    ``worker_config`` rides along in the first step only: ranks in other processes learn the
    leader's resolved settings and tier sizes from it (TRT-LLM does not forward ``DYN_KVBM_*``
    variables to its MPI workers).
    """

    step: int
    op_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    routes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    request_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    src: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dst: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    keys: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.uint64))
    fresh_blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    worker_config: Any = None

    def __len__(self) -> int:
        return int(self.op_ids.shape[0])

    def __iter__(self) -> Iterator[Op]:
        for i in range(len(self)):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            yield Op(
                int(self.op_ids[i]),
                Route(int(self.routes[i])),
                int(self.request_ids[i]),
                self.src[a:b],
                self.dst[a:b],
                self.keys[a:b],
            )

    def select(self, routes: frozenset[Route]) -> list[Op]:
        return [op for op in self if op.route in routes]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepOps):
            return NotImplemented
        arrays = ("op_ids", "routes", "request_ids", "offsets", "src", "dst", "keys", "fresh_blocks")
        return (
            self.step == other.step
            and all(np.array_equal(getattr(self, a), getattr(other, a)) for a in arrays)
            and self.worker_config == other.worker_config
        )

    @classmethod
    def build(cls, step: int, ops: Sequence[tuple[int, Route, int, np.ndarray, np.ndarray, np.ndarray]],
              worker_config: Any = None, fresh_blocks: np.ndarray | None = None) -> "StepOps":
        """Pack ``(op_id, route, request_id, src, dst, keys)`` tuples into flat arrays."""
        fresh = np.zeros(0, np.int64) if fresh_blocks is None else np.asarray(fresh_blocks, np.int64)
        if not ops:
            return cls(step, fresh_blocks=fresh, worker_config=worker_config)
        sizes = np.array([len(o[3]) for o in ops], np.int64)
        offsets = np.zeros(len(ops) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        return cls(
            step=step,
            op_ids=np.array([o[0] for o in ops], np.int64),
            routes=np.array([int(o[1]) for o in ops], np.int8),
            request_ids=np.array([o[2] for o in ops], np.int64),
            offsets=offsets,
            src=np.concatenate([np.asarray(o[3], np.int64) for o in ops]),
            dst=np.concatenate([np.asarray(o[4], np.int64) for o in ops]),
            keys=np.concatenate([np.asarray(o[5], np.uint64).reshape(-1, 2) for o in ops]),
            fresh_blocks=fresh,
            worker_config=worker_config,
        )


@dataclass(frozen=True)
class StepTiming:
    """How long rank 0's forward pass of step ``step`` took (the cost model learns prefill speed)."""

    step: int
    seconds: float


@dataclass(frozen=True)
class TierReady:
    """A rank's host tier can use its first ``slots`` slots now (it grows after start; never shrinks)."""

    rank: int
    kind: str
    slots: int


@dataclass(frozen=True)
class OpResult:
    """What one rank reports for one finished operation. ``ok=False`` is never counted as done.

    ``failed_blocks`` lists the positions (within the op) of blocks that failed verification, so
    the leader can drop exactly those slots from its registry. The leader acts on an operation once
    every rank has reported it.
    """

    op_id: int
    ok: bool
    rank: int = 0
    request_id: int = NO_REQUEST
    num_bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    failed_blocks: tuple[int, ...] = ()
    device_failed: bool = False  # the tier's device or filesystem failed (not one block): see leader.breaker


@dataclass(frozen=True)
class TierAllocation:
    """One tier as the leader sized it: which plugin, at which level, how many slots per rank, and
    its spec when the settings do not list it (the host staging tier of a disk-only pipeline)."""

    kind: str
    level: TierLevel
    num_slots: int
    spec: TierSpec | None = None


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs from the leader to allocate identical tiers, and where the leader
    listens for the ranks in other processes (``None`` with one rank)."""

    settings: KvbmSettings
    tiers: tuple[TierAllocation, ...]
    namespace: bytes
    world_size: int
    link: LinkAddress | None = None

    def tier_at(self, level: TierLevel) -> TierAllocation | None:
        return next((t for t in self.tiers if t.level == level), None)
