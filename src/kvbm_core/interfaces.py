"""The plugin types a distribution can contribute, as small abstract classes.

Each class carries a ``name`` (what a profile selects it by) and is returned from one of the
``kvbm_*`` type hooks in :mod:`kvbm_core.hookspecs`. :data:`kvbm_core.plugin_kinds.PLUGIN_KINDS`
binds each hook to its base class here and to the checks a contributed class must pass when its
plugin registers; anything else is a :class:`~kvbm_core.errors.PluginError` naming the distribution.

- :class:`StorageTier` lives on every worker and owns bytes (host memory, a disk file). A tier
  subclasses the storage base of its level (:mod:`kvbm_core.storage.contracts`), not this class.
- :class:`EvictionPolicy` and :class:`OffloadFilter` live on the leader and own no bytes.
- :class:`Transport` carries control traffic between processes (settings, completions, events).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from kvbm_core.ops import TierLevel

if TYPE_CHECKING:
    import numpy as np
    import torch

    from kvbm_core.layout import BlockLayout
    from kvbm_core.settings.model import KvbmSettings, TierSpec


@dataclass(frozen=True)
class CheckResult:
    """One line of ``kvbm doctor``: ``status`` is ``pass``, ``warn`` or ``fail``."""

    name: str
    status: str
    detail: str = ""


@dataclass(frozen=True)
class TierContext:
    """What a worker-side tier needs to allocate its storage.

    ``num_slots`` is decided by the leader (override count, else GB over bytes per block across
    ranks). ``namespace`` is a 16-byte digest of everything that changes a block's bytes; stored
    blocks carry it so that a file written for another model or layout is never served.
    """

    spec: "TierSpec"
    layout: "BlockLayout"
    num_slots: int
    rank: int
    world_size: int
    namespace: bytes
    device: "torch.device | None" = None
    settings: "KvbmSettings | None" = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class StorageTier(ABC):
    """Physical storage of one tier on one rank: ``num_slots`` slots of one block each.

    The transfer engine drives a tier through the storage base of its ``level``
    (:class:`~kvbm_core.storage.HostStorage` at ``HOST``, :class:`~kvbm_core.storage.BlockFileStorage`
    at ``DISK``): a tier class subclasses that base, which the registry checks when the plugin
    registers (:data:`kvbm_core.storage.contracts.TIER_CONTRACTS`).
    """

    name: ClassVar[str]
    level: ClassVar[TierLevel]
    #: What the tier was built with; the engine reads ``context.num_slots``.
    context: TierContext
    #: Planning figures for the leader's cost model (GB/s per rank) until transfers are observed.
    read_gbps: ClassVar[float] = 1.0
    write_gbps: ClassVar[float] = 1.0

    def __init__(self, context: TierContext) -> None:
        self.context = context

    @classmethod
    def bytes_per_slot(cls, layout: "BlockLayout") -> int:
        """Bytes one slot takes in this tier's storage; the leader sizes ``num_slots`` with it.

        A tier that stores more than the block (a disk record's header and alignment) says so here,
        so that ``num_slots * bytes_per_slot`` stays within the configured capacity.
        """
        return layout.bytes_per_block

    @classmethod
    def validate_options(cls, options: Mapping[str, Any], key: str) -> None:
        """Raise :class:`~kvbm_core.errors.ConfigError` naming ``key`` for a bad option."""

    @classmethod
    def diagnose(cls, spec: "TierSpec", settings: "KvbmSettings") -> list[CheckResult]:
        """Checks for ``kvbm doctor``: can this machine host the tier as configured?"""
        return []

    @abstractmethod
    def close(self) -> None:
        """Release the storage. Called once; must not raise on a half-built tier."""


class EvictionPolicy(ABC):
    """Orders the evictable slots of one tier. Owns no bytes and knows nothing of pins.

    The tier state adds a slot when it becomes evictable (registered, unpinned, idle) and discards
    it when it is freed; :meth:`victim` removes and returns the next slot to evict. A slot pinned
    after it was added may stay here (telling the policy of every pin would cost a call per matched
    block): offered as a victim, the tier skips it, and adds it again, as newly used, when unpinned.
    """

    name: ClassVar[str]

    def __init__(self, num_slots: int, options: Mapping[str, Any] | None = None) -> None:
        self.num_slots = num_slots
        self.options = dict(options or {})

    @abstractmethod
    def add(self, slot: int, priority: int, tick: int) -> None:
        """``slot`` became evictable; ``priority`` is its retention priority (higher stays longer)."""

    @abstractmethod
    def discard(self, slot: int) -> None:
        """``slot`` is no longer evictable (pinned again, or freed). Unknown slots are ignored."""

    @abstractmethod
    def victim(self) -> int | None:
        """Remove and return the slot to evict next, or None when nothing is evictable.

        The slot must be one this policy was given with :meth:`add` and still holds. Offering a
        slot twice in one allocation, a value that is not a slot, or None while slots are
        evictable is a misbehaviour: the tier then replaces the policy with the built-in ``lru``.
        """

    @abstractmethod
    def __len__(self) -> int:
        """Number of slots the policy holds (for diagnostics: the tier keeps its own counts)."""


class OffloadFilter(ABC):
    """Admission control for one offload route (for example host -> disk).

    ``admit`` is offered the identities of blocks that could move and answers, per block, whether
    they should. It is called once per offer: a block offered again counts as seen again.
    """

    name: ClassVar[str]

    def __init__(self, options: Mapping[str, Any] | None = None, clock: Callable[[], float] | None = None):
        self.options = dict(options or {})

    @abstractmethod
    def admit(self, keys: "np.ndarray") -> "np.ndarray":
        """``keys`` is an ``[n, 2]`` uint64 array of block identities; return an ``[n]`` bool array.

        Anything else (another shape or dtype, or an exception) switches the filter off for the
        rest of the run: the route then admits nothing.
        """


class Transport(ABC):
    """Carries control traffic between the leader and the workers, or out to the cluster."""

    name: ClassVar[str]

    def __init__(self, settings: "KvbmSettings") -> None:
        self.settings = settings

    @classmethod
    def validate_options(cls, options: Mapping[str, Any], key: str) -> None:
        """Raise :class:`~kvbm_core.errors.ConfigError` naming ``key`` for a bad ``transport_options`` entry."""

    @classmethod
    def diagnose(cls, settings: "KvbmSettings") -> list[CheckResult]:
        """Checks for ``kvbm doctor`` (for example: is the configured server reachable?)."""
        return []

    @abstractmethod
    def close(self) -> None:
        """Stop and release connections."""


__all__: Sequence[str] = [
    "CheckResult",
    "EvictionPolicy",
    "OffloadFilter",
    "StorageTier",
    "TierContext",
    "TierLevel",
    "Transport",
]
