"""kvbm-tier-disk: the local disk tier (G3)."""

from kvbm_core.hookspecs import hookimpl
from kvbm_core.interfaces import StorageTier, TierLevel


class LocalDiskTier(StorageTier):
    name = "disk"
    level = TierLevel.DISK
    read_gbps = 1.5
    write_gbps = 2.0

    def close(self) -> None:
        pass


@hookimpl
def kvbm_tier_types():
    return [LocalDiskTier]
