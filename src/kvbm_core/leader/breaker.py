"""A circuit breaker per file-backed tier: a failing device is routed around, then tried again.

A disk whose filesystem failed (``EIO`` after an ext4 shutdown), filled up or went read-only fails
every operation sent to it; without a breaker every request would keep paying for reads and writes
that cannot succeed. Only errors that mean the device (not one block) is failing count
(:attr:`~kvbm_core.ops.OpResult.device_failed`, from :data:`~kvbm_core.storage.base.DEVICE_ERRNOS`);
a block that fails its checksum is that block's problem and is only dropped.

- **in service**: operations are planned as usual; ``threshold`` device failures in a row take the
  tier out of service (one warning line, ``kvbm_tier_service_changed``).
- **out of service**: nothing is planned to or from the tier: lookups stop at the host, offload
  stops at the host, requests recompute what only the tier held. After ``backoff`` seconds the tier
  is **on trial**: operations are planned again; the first result decides. Success puts it back
  in service (one info line); a device failure takes it out again for twice as long (at most
  ``max_backoff_s``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from kvbm_core.logging import get_logger

log = get_logger("kvbm.leader.breaker")

FAILURES_TO_OPEN = 3
FIRST_BACKOFF_S = 30.0
MAX_BACKOFF_S = 600.0


class TierService(enum.Enum):
    IN_SERVICE = "in_service"
    OUT_OF_SERVICE = "out_of_service"
    ON_TRIAL = "on_trial"


class TierBreaker:
    """The service state of one tier, from the results of the operations that touched it."""

    def __init__(self, tier: str, clock: Callable[[], float], notify: Callable[[str, bool, str], None], *,
                 threshold: int = FAILURES_TO_OPEN, first_backoff_s: float = FIRST_BACKOFF_S,
                 max_backoff_s: float = MAX_BACKOFF_S) -> None:
        self.tier = tier
        self._clock = clock
        self._notify = notify
        self._threshold = threshold
        self._first_backoff_s = first_backoff_s
        self._max_backoff_s = max_backoff_s
        self.state = TierService.IN_SERVICE
        self._failures = 0
        self._backoff_s = first_backoff_s
        self._retry_at = 0.0
        self.times_opened = 0

    def allows(self) -> bool:
        """Whether operations may be planned on the tier now (out of service until its retry time)."""
        if self.state is TierService.OUT_OF_SERVICE and self._clock() >= self._retry_at:
            self.state = TierService.ON_TRIAL
            log.info("trying the tier again", tier=self.tier)
        return self.state is not TierService.OUT_OF_SERVICE

    def record(self, ok: bool, device_failed: bool, error: str = "") -> None:
        """One finished operation on the tier (every rank's results merged)."""
        if ok:
            self._failures = 0
            if self.state is TierService.ON_TRIAL:
                self.state = TierService.IN_SERVICE
                self._backoff_s = self._first_backoff_s
                log.info("tier back in service", tier=self.tier)
                self._notify(self.tier, True, "")
            return
        if not device_failed:
            return  # a bad block, not a bad device
        self._failures += 1
        if self.state is TierService.ON_TRIAL:
            self._backoff_s = min(self._backoff_s * 2, self._max_backoff_s)
            self._open(error)
        elif self.state is TierService.IN_SERVICE and self._failures >= self._threshold:
            self._open(error)

    def _open(self, error: str) -> None:
        self.state = TierService.OUT_OF_SERVICE
        self._retry_at = self._clock() + self._backoff_s
        self.times_opened += 1
        log.warning("tier taken out of service: its device is failing; requests recompute what only it held",
                    tier=self.tier, failures=self._failures, retry_in_s=self._backoff_s, error=error)
        self._notify(self.tier, False, error)
