"""kvbm-tier-cpu: the pinned host memory tier (G2).

One pool per rank: ``num_slots`` blocks, block-major, each slot ``bytes_per_block`` bytes, exposed as
a ``[num_slots, bytes_per_block]`` uint8 tensor. On a CUDA rank the pool is pinned (registered with
CUDA in segments, see :mod:`kvbm_core.storage.host_memory`) so copies run at PCIe speed; without
CUDA it is plain memory, said once in the log.

The constructor returns once the first ``start_mb`` of the pool is usable (one segment by default,
whatever the tier's size: about 0.1 s at the rate the H200 machine allocates pinned memory);
background threads add the other segments in slot order, and :attr:`PinnedHostTier.ready_slots`
counts the usable slots. A tier whose background growth fails logs it and keeps serving with the
slots it has.

Options (``tiers: [{kind: cpu, options: {...}}]``): ``alloc_threads`` (threads that fault in and
register the start), ``grow_threads`` (threads that add the rest; default half of
``alloc_threads``), ``segment_mb`` (registration segment, MiB, default 512), ``start_mb`` (MiB
usable before the engine starts, rounded up to whole segments; default one segment; the pool size
or more allocates everything at start).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import structlog
import torch

from kvbm_core.errors import ConfigError
from kvbm_core.hookspecs import hookimpl
from kvbm_core.interfaces import CheckResult, TierContext
from kvbm_core.storage import HostMemory, HostStorage

log = structlog.get_logger("kvbm.tier.cpu")

_THREAD_OPTIONS = {"alloc_threads", "grow_threads"}
_MIB_OPTIONS = {"segment_mb", "start_mb"}
DEFAULT_SEGMENT_MB = 512


class PinnedHostTier(HostStorage):
    """The ``cpu`` tier. ``paused=True`` (for subclasses that control when the pool grows) holds the
    background growth until :meth:`resume_growth`."""

    name = "cpu"
    read_gbps = 50.0
    write_gbps = 50.0

    def __init__(self, context: TierContext, *, paused: bool = False) -> None:
        super().__init__(context)
        options = context.spec.options
        self.validate_options(options, f"tiers.{self.name}.options")
        bpb = context.layout.bytes_per_block
        if context.num_slots <= 0:
            raise ConfigError(f"tiers.{self.name}", f"needs at least one slot, got {context.num_slots}")
        segment_mb = options.get("segment_mb", DEFAULT_SEGMENT_MB)
        self._memory = HostMemory(
            context.num_slots * bpb,
            device=context.device,
            unit_bytes=bpb,
            segment_target_bytes=max(1, int(segment_mb * (1 << 20))),
            threads=options.get("alloc_threads"),
            grow_threads=options.get("grow_threads"),
            start_bytes=int(options["start_mb"] * (1 << 20)) if "start_mb" in options else 1,  # 1: one segment
            paused=paused,
            label=f"{self.name} tier rank {context.rank}",
        )
        self._bpb = bpb
        self._slots = self._memory.tensor.view(context.num_slots, bpb)
        self.pinned = self._memory.pinned
        self.segment_slots = self._memory.segment_bytes // bpb
        self.allocation = self._memory.stats
        stats = self.allocation
        log.info(
            "host tier allocated",
            rank=context.rank,
            slots=context.num_slots,
            ready_slots=self.ready_slots,
            gb=round(context.num_slots * bpb / 1e9, 3),
            ready_gb=round(stats.nbytes / 1e9, 3),
            pinned=stats.pinned,
            seconds=round(stats.total_s, 3),
            populate_s=round(stats.populate_s, 3),
            register_s=round(stats.register_s, 3),
            gbps=round(stats.gbps, 2),
        )

    @property
    def slots(self) -> torch.Tensor:
        return self._slots

    @property
    def ready_slots(self) -> int:
        memory = self._memory
        return memory.ready_bytes // self._bpb if memory is not None else 0

    def wait_ready(self, slots: int, timeout: float) -> int:
        memory = self._memory
        if memory is None:
            return 0
        return memory.wait_ready(slots * self._bpb, timeout) // self._bpb

    @property
    def growth_error(self) -> str | None:
        """Why the pool stopped growing before it was whole (None if it did not)."""
        return self._memory.growth_error if self._memory is not None else None

    def resume_growth(self) -> None:
        """Let a tier built with ``paused=True`` grow (idempotent)."""
        if self._memory is not None:
            self._memory.resume_growth()

    @classmethod
    def validate_options(cls, options: Mapping[str, Any], key: str) -> None:
        unknown = set(options) - _THREAD_OPTIONS - _MIB_OPTIONS
        if unknown:
            raise ConfigError(key, f"unknown option(s) {sorted(unknown)}", _THREAD_OPTIONS | _MIB_OPTIONS)
        for name in sorted(set(options)):
            value = options[name]
            number = (int, float) if name in _MIB_OPTIONS else int
            if isinstance(value, bool) or not isinstance(value, number) or not (value > 0 and math.isfinite(value)):
                what = "a positive number of MiB" if name in _MIB_OPTIONS else "a positive integer"
                raise ConfigError(f"{key}.{name}", f"must be {what}, got {value!r}")

    @classmethod
    def diagnose(cls, spec: Any, settings: Any) -> list[CheckResult]:
        if torch.cuda.is_available():
            return [CheckResult("cpu tier memory", "pass", "pinned host memory (cudaHostRegister)")]
        return [CheckResult("cpu tier memory", "warn", "no CUDA device: the host pool is pageable")]

    def close(self) -> None:
        memory = getattr(self, "_memory", None)
        if memory is not None:
            self._slots = torch.empty(0, dtype=torch.uint8)
            self._memory = None
            memory.close()


@hookimpl
def kvbm_tier_types():
    return [PinnedHostTier]
