"""kvbm-policy-frequency: policies that count how often a block is seen.

- ``frequency`` (disk offload filter, below): host -> disk admission that spares the SSD one-off
  blocks.
- ``scan_resistant`` (eviction, :mod:`kvbm_policy_frequency.eviction`): keeps part of a working set
  larger than its tier, where LRU cycles all of it out; ``eviction: scan_resistant`` in a profile.

The filter's semantics (those of Dynamo KVBM's disk offload filter, which the seed guide documents):

- The first offer of a block sets its frequency to 1; each later offer doubles it.
- An offer is admitted when the frequency, after this offer, is at least ``min_frequency`` (2): a
  block reaches disk on its second sighting.
- Every ``decay_interval_s`` (600 s) every frequency drops by 1; a block at 0 is forgotten.
  Decay is applied lazily, on the next call, as the number of whole intervals elapsed on the
  injected clock since the last tick - the same counts a periodic tick would leave, since counts are
  only observed through offers.
- At most ``max_entries`` (1,000,000) blocks are tracked: when an offer pushes the count above it,
  extra decay passes run until it fits, and the interval restarts (as Dynamo does).

What counts as an offer is the block manager's choice (every host store, skipped duplicate host
store and host hit); this plugin only counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from kvbm_core.errors import ConfigError
from kvbm_core.hookspecs import hookimpl
from kvbm_core.interfaces import EvictionPolicy, OffloadFilter
from kvbm_policy_frequency.eviction import ScanResistantEviction

OPTIONS_KEY = "disk_offload_filter.options"
DEFAULTS: Mapping[str, float] = {"min_frequency": 2, "decay_interval_s": 600.0, "max_entries": 1_000_000}
_SATURATION = 1 << 62


class FrequencyFilter(OffloadFilter):
    """Admit a block to disk once it has been offered ``min_frequency`` times (doubling, decaying)."""

    name = "frequency"

    def __init__(self, options: Mapping[str, Any] | None = None, clock: Callable[[], float] | None = None):
        super().__init__(options, clock)
        unknown = set(self.options) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"{OPTIONS_KEY}.{sorted(unknown)[0]}", "unknown option", DEFAULTS.keys())
        opts = {**DEFAULTS, **self.options}
        self.min_frequency = _positive_int(opts["min_frequency"], "min_frequency")
        self.max_entries = _positive_int(opts["max_entries"], "max_entries")
        interval = opts["decay_interval_s"]
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not math.isfinite(interval) or interval <= 0:
            raise ConfigError(f"{OPTIONS_KEY}.decay_interval_s", f"got {interval!r}", "a finite number of seconds > 0")
        self.decay_interval_s = float(interval)
        self._clock = clock or time.monotonic
        self._last_tick = self._clock()
        self._counts: dict[int, int] = {}

    def admit(self, keys: np.ndarray) -> np.ndarray:
        self._catch_up()
        counts = self._counts
        threshold = self.min_frequency
        keys = np.asarray(keys, np.uint64).reshape(-1, 2)
        out = np.zeros(len(keys), bool)
        for i, (hi, lo) in enumerate(keys.tolist()):
            key = (hi << 64) | lo
            count = counts.get(key)
            count = 1 if count is None else min(count * 2, _SATURATION)
            counts[key] = count
            out[i] = count >= threshold
        if len(counts) > self.max_entries:
            while len(self._counts) > self.max_entries:
                self._decay(1)
            self._last_tick = self._clock()
        return out

    def frequency(self, key: Sequence[int]) -> int:
        """The current frequency of one ``[2]`` key (0 when untracked), after due decay."""
        self._catch_up()
        return self._counts.get((int(key[0]) << 64) | int(key[1]), 0)

    def __len__(self) -> int:
        return len(self._counts)

    def _catch_up(self) -> None:
        ticks = int((self._clock() - self._last_tick) // self.decay_interval_s)
        if ticks > 0:
            self._decay(ticks)
            self._last_tick += ticks * self.decay_interval_s

    def _decay(self, ticks: int) -> None:
        self._counts = {k: c - ticks for k, c in self._counts.items() if c > ticks}


def _positive_int(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{OPTIONS_KEY}.{option}", f"got {value!r}", "a whole number >= 1")
    return value


@hookimpl
def kvbm_offload_filters() -> Sequence[type[OffloadFilter]]:
    return [FrequencyFilter]


@hookimpl
def kvbm_eviction_policies() -> Sequence[type[EvictionPolicy]]:
    return [ScanResistantEviction]
