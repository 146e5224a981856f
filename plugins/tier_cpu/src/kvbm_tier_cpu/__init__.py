"""kvbm-tier-cpu: the pinned host memory tier (G2).

One pool per rank: ``num_slots`` blocks, block-major, each slot ``bytes_per_block`` bytes, exposed as
a ``[num_slots, bytes_per_block]`` uint8 tensor. On a CUDA rank the pool is pinned (registered with
CUDA in parallel segments, see :mod:`kvbm_core.storage.host_memory`) so copies run at PCIe speed;
without CUDA it is plain memory, said once in the log. Options (``tiers: [{kind: cpu, options:
{...}}]``): ``alloc_threads`` (threads that fault in and register the pool) and ``segment_mb``
(registration segment size).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
import torch

from kvbm_core.errors import ConfigError
from kvbm_core.hookspecs import hookimpl
from kvbm_core.interfaces import CheckResult, TierContext
from kvbm_core.storage import HostMemory, HostStorage, check_positive_int_options

log = structlog.get_logger("kvbm.tier.cpu")

_OPTIONS = {"alloc_threads", "segment_mb"}


class PinnedHostTier(HostStorage):
    name = "cpu"
    read_gbps = 50.0
    write_gbps = 50.0

    def __init__(self, context: TierContext) -> None:
        super().__init__(context)
        options = context.spec.options
        self.validate_options(options, f"tiers.{self.name}.options")
        bpb = context.layout.bytes_per_block
        if context.num_slots <= 0:
            raise ConfigError(f"tiers.{self.name}", f"needs at least one slot, got {context.num_slots}")
        self._memory = HostMemory(
            context.num_slots * bpb,
            device=context.device,
            unit_bytes=bpb,
            segment_target_bytes=int(options.get("segment_mb", 512)) << 20,
            threads=options.get("alloc_threads"),
            label=f"{self.name} tier rank {context.rank}",
        )
        self._slots = self._memory.tensor.view(context.num_slots, bpb)
        self.pinned = self._memory.pinned
        self.segment_slots = self._memory.segment_bytes // bpb
        self.allocation = self._memory.stats
        stats = self.allocation
        log.info(
            "host tier allocated",
            rank=context.rank,
            slots=context.num_slots,
            gb=round(stats.nbytes / 1e9, 3),
            pinned=stats.pinned,
            seconds=round(stats.total_s, 3),
            populate_s=round(stats.populate_s, 3),
            register_s=round(stats.register_s, 3),
            gbps=round(stats.gbps, 2),
        )

    @property
    def slots(self) -> torch.Tensor:
        return self._slots

    @classmethod
    def validate_options(cls, options: Mapping[str, Any], key: str) -> None:
        check_positive_int_options(options, key, _OPTIONS)

    @classmethod
    def diagnose(cls, spec: Any, settings: Any) -> list[CheckResult]:
        if torch.cuda.is_available():
            return [CheckResult("cpu tier memory", "pass", "pinned host memory (cudaHostRegister)")]
        return [CheckResult("cpu tier memory", "warn", "no CUDA device: the host pool is pageable")]

    def close(self) -> None:
        memory = getattr(self, "_memory", None)
        if memory is not None:
            self._slots = torch.empty(0, dtype=torch.uint8)
            memory.close()
            self._memory = None


@hookimpl
def kvbm_tier_types():
    return [PinnedHostTier]
