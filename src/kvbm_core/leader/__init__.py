"""The leader (scheduler side, rank 0): block identity in, tier slots and per-step operations out.

The data path by module: :mod:`~kvbm_core.identity` (prompt -> block keys), :mod:`.tier_state`
(which key lives in which slot, in which :mod:`.slot_state`), :mod:`.request` (one request's
phases), :mod:`.cost_model` (is a load worth it?), :mod:`.manager` (match, schedule, results),
:mod:`.tiers` (sizing), :mod:`.disk_offload` (background host -> disk), :mod:`.key_index` (the
vectorized key -> slot table), :mod:`.planned_op`, :mod:`.invariants` (checked by the tests),
:mod:`.stats` (accounting).
"""

from kvbm_core.leader.manager import BlockManager, Match, RequestLike
from kvbm_core.leader.request import RequestPhase, RequestStateError
from kvbm_core.leader.slot_state import SlotState
from kvbm_core.leader.stats import LeaderStats
from kvbm_core.leader.tier_state import SlotStateError

__all__ = ["BlockManager", "LeaderStats", "Match", "RequestLike", "RequestPhase", "RequestStateError",
           "SlotState", "SlotStateError"]
