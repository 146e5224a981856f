"""Which storage contract a tier must meet at its level: one row per level, checked twice.

The transfer engine drives a host-level tier through :class:`~kvbm_core.storage.HostStorage` and a
disk-level tier through :class:`~kvbm_core.storage.BlockFileStorage`. A :class:`TierContract` row
names the level, that base class and the consistency the engine relies on beyond the members. The
members come from the base class itself, so the contract is stated once:

- its **abstract members** (methods, properties) are checked on the class when the plugin registers
  (:func:`check_tier_class`), together with the level, the base, the planning figures and a probe
  of ``bytes_per_slot``;
- its **annotated attributes without a default** (``segment_slots``, ``record_bytes``, ``lanes``,
  ...) are set by the tier's constructor, so they are checked on the instance when it is built
  (:func:`check_tier_instance`), with their annotated types and the row's consistency check (for a
  disk tier: ``record_bytes == bytes_per_slot(layout)``, lanes that hold ``io_records`` records).

Members the base implements itself (``HostStorage.ready_slots``, the usable prefix of a tier that
grows after it starts) need no override; the row's consistency check reads their value on the built
tier all the same (``0 <= ready_slots <= num_slots``).

A tier level below disk (a remote store) is one more :class:`~kvbm_core.interfaces.TierLevel`, one
more base class with its members, and one more row in :data:`TIER_CONTRACTS`.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kvbm_core.interfaces import StorageTier, TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.storage.base import BlockFileStorage, HostStorage, StagingLanes

PROBE_LAYOUT = BlockLayout(num_layers=2, kv_factor=2, elems_per_block=4096, dtype="bfloat16", tokens_per_block=32)
"""The layout ``bytes_per_slot`` is probed with when a tier class registers (32 KiB blocks)."""


@dataclass(frozen=True)
class TierContract:
    """What a tier at ``level`` must be: a subclass of ``base``, meeting ``consistent`` once built.

    ``consistent(tier)`` returns the first problem of a built tier beyond its members, or None.
    """

    level: TierLevel
    base: type[StorageTier]
    consistent: Callable[[Any], str | None]

    def methods(self) -> list[str]:
        """The base's abstract members: a tier class must implement every one."""
        return sorted(getattr(self.base, "__abstractmethods__", ()))

    def attributes(self) -> dict[str, Any]:
        """Attributes a built tier must have, with their annotated types (those without a default)."""
        hints = typing.get_type_hints(self.base)
        defined = {name for klass in self.base.__mro__ for name in vars(klass)}
        return {name: hint for name, hint in hints.items()
                if typing.get_origin(hint) is not typing.ClassVar and name not in defined}

    def members(self) -> list[str]:
        """Every member the contract names, methods first."""
        return [*self.methods(), *self.attributes()]


def _host_consistent(tier: HostStorage) -> str | None:
    context = tier.context
    slots = tier.slots
    expected = (context.num_slots, context.layout.bytes_per_block)
    if not isinstance(slots, torch.Tensor) or slots.dtype != torch.uint8 or tuple(slots.shape) != expected:
        got = f"{type(slots).__name__} {getattr(slots, 'dtype', '')} {tuple(getattr(slots, 'shape', ()))}"
        return f"slots must be a uint8 tensor of shape {expected} (num_slots, bytes_per_block), got {got}"
    if tier.segment_slots < 1:
        return f"segment_slots must be at least 1, got {tier.segment_slots}"
    ready = tier.ready_slots
    if isinstance(ready, bool) or not isinstance(ready, int) or not 0 <= ready <= context.num_slots:
        return f"ready_slots must be an int in [0, num_slots={context.num_slots}], got {ready!r}"
    return None


def _disk_consistent(tier: BlockFileStorage) -> str | None:
    layout = tier.context.layout
    per_slot = type(tier).bytes_per_slot(layout)
    if tier.record_bytes != per_slot:
        return (f"record_bytes {tier.record_bytes} differs from bytes_per_slot(layout) {per_slot}: the leader "
                f"sizes the tier with bytes_per_slot, the file holds records of record_bytes")
    if tier.record_bytes < layout.bytes_per_block:
        return f"record_bytes {tier.record_bytes} is smaller than a block ({layout.bytes_per_block} bytes)"
    if tier.io_records < 1 or tier.io_threads < 1:
        return f"io_records and io_threads must be at least 1, got {tier.io_records} and {tier.io_threads}"
    lanes = tier.lanes
    if lanes.count < 1 or lanes.records < tier.io_records or lanes.record_bytes != tier.record_bytes:
        return (f"lanes must hold at least one lane of io_records ({tier.io_records}) records of record_bytes "
                f"({tier.record_bytes}), got {lanes.count} x {lanes.records} x {lanes.record_bytes}")
    if tier.device_direct and not (isinstance(tier.device_lanes, StagingLanes)
                                   and tier.device_lanes.records >= tier.io_records):
        return "device_direct is set but device_lanes does not hold io_records blocks per lane"
    return None


TIER_CONTRACTS: Mapping[TierLevel, TierContract] = {
    c.level: c
    for c in (
        TierContract(TierLevel.HOST, HostStorage, _host_consistent),
        TierContract(TierLevel.DISK, BlockFileStorage, _disk_consistent),
    )
}
"""The contract of each tier level, in level order."""


def contract_of(cls: type) -> TierContract | str:
    """The contract of ``cls``'s level, or the problem with its ``level``."""
    level = getattr(cls, "level", None)
    accepted = ", ".join(f"{int(lv)} ({lv.name})" for lv in TIER_CONTRACTS)
    try:
        contract = TIER_CONTRACTS.get(TierLevel(level))  # type: ignore[arg-type]
    except (ValueError, TypeError):
        contract = None
    if contract is None:
        return f"has level {level!r}; accepted: {accepted}"
    return contract


def check_tier_class(cls: type) -> str | None:
    """The first way a tier class breaks its level's contract, or None (see the module docstring)."""
    contract = contract_of(cls)
    if isinstance(contract, str):
        return contract
    base = contract.base
    if not issubclass(cls, base):
        return (f"is a {contract.level.name} tier but does not subclass {base.__qualname__}, whose members it "
                f"must provide: {', '.join(contract.members())}")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        return f"does not implement {base.__qualname__} member(s): {', '.join(missing)}"
    for figure in ("read_gbps", "write_gbps"):
        value = getattr(cls, figure, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            return f"{figure} must be a positive number of GB/s, got {value!r}"
    try:
        per_slot = cls.bytes_per_slot(PROBE_LAYOUT)  # type: ignore[attr-defined]
    except Exception as exc:  # the classmethod is the plugin's code
        return f"bytes_per_slot(layout) raised {exc!r}"
    if isinstance(per_slot, bool) or not isinstance(per_slot, int) or per_slot < PROBE_LAYOUT.bytes_per_block:
        return (f"bytes_per_slot(layout) returned {per_slot!r} for a block of {PROBE_LAYOUT.bytes_per_block} "
                "bytes; expected an int of at least the block size")
    return None


def check_tier_instance(tier: StorageTier) -> str | None:
    """The first way a built tier breaks its level's contract, or None (see the module docstring)."""
    contract = contract_of(type(tier))
    if isinstance(contract, str):
        return contract
    for name, hint in contract.attributes().items():
        if not hasattr(tier, name):
            return f"has no attribute {name!r} after construction ({contract.base.__qualname__} needs it)"
        value = getattr(tier, name)
        if isinstance(hint, type) and not isinstance(value, hint):
            return f"attribute {name!r} must be {hint.__qualname__}, got {type(value).__qualname__} {value!r}"
    return contract.consistent(tier)
