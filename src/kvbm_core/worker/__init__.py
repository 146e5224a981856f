"""The worker side of kvbm: one rank's tiers and the engine that moves its bytes.

Workers own bytes only. :func:`build_tiers` allocates the tiers the leader sized;
:class:`TransferEngine` executes the leader's operations (:mod:`kvbm_core.ops`) by slot index and
reports each as an :class:`~kvbm_core.ops.OpResult`.
"""

from kvbm_core.worker.engine import TransferEngine
from kvbm_core.worker.tiers import build_tiers

__all__ = ["TransferEngine", "build_tiers"]
