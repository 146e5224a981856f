"""kvbm-tier-disk: the local disk tier (G3), preallocated, O_DIRECT, checksummed and restart-safe.

- :mod:`kvbm_tier_disk.format`: the on-disk record format (shared with kvbm-tier-gds).
- :mod:`kvbm_tier_disk.blockfile`: creating, preallocating and opening the per-rank file.
- :mod:`kvbm_tier_disk.tier`: :class:`LocalDiskTier`, the tier the engine drives.
"""

from kvbm_core.hookspecs import hookimpl
from kvbm_tier_disk.tier import LocalDiskTier


@hookimpl
def kvbm_tier_types():
    return [LocalDiskTier]


__all__ = ["LocalDiskTier"]
