"""kvbm-tier-cpu: the pinned host memory tier (G2)."""

from kvbm_core.hookspecs import hookimpl
from kvbm_core.interfaces import StorageTier, TierLevel


class PinnedHostTier(StorageTier):
    name = "cpu"
    level = TierLevel.HOST
    read_gbps = 50.0
    write_gbps = 50.0

    def close(self) -> None:
        pass


@hookimpl
def kvbm_tier_types():
    return [PinnedHostTier]
