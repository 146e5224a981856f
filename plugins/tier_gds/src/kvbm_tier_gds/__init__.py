"""kvbm-tier-gds: GPUDirect Storage through kvikio (G3)."""

from kvbm_core.hookspecs import hookimpl
from kvbm_core.interfaces import StorageTier, TierLevel


class GdsTier(StorageTier):
    name = "gds"
    level = TierLevel.DISK
    read_gbps = 1.6
    write_gbps = 2.2

    def close(self) -> None:
        pass


@hookimpl
def kvbm_tier_types():
    return [GdsTier]
