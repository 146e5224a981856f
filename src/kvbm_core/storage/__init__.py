"""Tier-facing storage building blocks shared by the tier plugins and the transfer engine.

``base`` holds the abstract tiers the engine drives (:class:`HostStorage`, :class:`BlockFileStorage`)
and staging lanes; ``contracts`` says which of them each tier level must subclass and checks it;
``host_memory`` allocates page-aligned, pinned host memory quickly.
"""

from kvbm_core.storage.base import (
    DEVICE_ERRNOS,
    BlockFileStorage,
    HostStorage,
    ReadCheck,
    RecoveryReport,
    StagingLanes,
    TierIOError,
    check_positive_int_options,
)
from kvbm_core.storage.contracts import TIER_CONTRACTS, TierContract
from kvbm_core.storage.host_memory import AllocationStats, HostMemory, cuda_pinning_available

__all__ = [
    "DEVICE_ERRNOS",
    "AllocationStats",
    "BlockFileStorage",
    "HostMemory",
    "HostStorage",
    "ReadCheck",
    "RecoveryReport",
    "StagingLanes",
    "TIER_CONTRACTS",
    "TierContract",
    "TierIOError",
    "check_positive_int_options",
    "cuda_pinning_available",
]
