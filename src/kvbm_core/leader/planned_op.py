"""An operation the leader handed to the workers and has not heard back about.

It remembers what its result must complete or undo: the tier side (the tier read by a load or a
host -> disk copy, the tier written by a store), the slots, the keys and their Dynamo sequence
hashes (for ``kvbm_blocks_stored``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvbm_core.leader.tier_state import TierState
from kvbm_core.ops import Route


@dataclass(eq=False)
class PlannedOp:
    """``src``/``dst`` are device block ids on the device side and slot indices on a tier side."""

    op_id: int
    route: Route
    request_id: int
    src: np.ndarray
    dst: np.ndarray
    keys: np.ndarray
    seq: np.ndarray
    tier: TierState  # host for loads from it and for host -> disk copies; the target for stores
