"""What the transfer engine needs from a tier, beyond :class:`~kvbm_core.interfaces.StorageTier`.

- :class:`HostStorage` (G2): ``num_slots`` rows of ``bytes_per_block`` bytes in one uint8 tensor;
  the engine copies device blocks to and from rows by slot index.
- :class:`BlockFileStorage` (G3): slots are records in a file. The engine hands it runs of
  consecutive slots with their 128-bit keys; the tier stamps records on write and verifies them on
  read (:class:`ReadCheck`), so a torn, corrupted or foreign record is never handed to the GPU.
- :class:`StagingLanes`: a fixed set of aligned staging areas (pinned host memory, or device memory
  for GPUDirect reads) that bound how much data is in flight between a file and the GPU.
- How a file-backed tier reports trouble: a block that fails verification is a ``False`` in its
  :class:`ReadCheck` (that block is bad; the others of the read are fine); a failed read or write
  raises :class:`TierIOError`, whose ``device_failed`` says whether the error means the device or
  filesystem is failing or full (:data:`DEVICE_ERRNOS`). What start-up recovery discarded, and why,
  is :meth:`BlockFileStorage.recovery_report`.

Tiers own bytes and formats; they never order operations (the engine's hazards do that). The
members of :class:`HostStorage` and :class:`BlockFileStorage` are their levels' contracts: abstract
members and annotated attributes without a default are required, and
:mod:`kvbm_core.storage.contracts` checks them (on the class at registration, on the instance when
it is built).
"""

from __future__ import annotations

import errno
import os
import queue
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from kvbm_core.errors import ConfigError, StorageError
from kvbm_core.interfaces import StorageTier, TierLevel
from kvbm_core.storage.host_memory import AllocationStats, HostMemory


def check_positive_int_options(options: Mapping[str, Any], key: str, allowed: set[str]) -> None:
    """A tier's ``options``: only ``allowed`` names, each a positive integer; errors name the key."""
    unknown = set(options) - allowed
    if unknown:
        raise ConfigError(key, f"unknown option(s) {sorted(unknown)}", allowed)
    for name in allowed & set(options):
        value = options[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{key}.{name}", f"must be a positive integer, got {value!r}")


#: Errors that say the device or filesystem under a tier file is failing, full or gone, rather than
#: that one call was wrong: a caller should count them per tier (a circuit breaker), not blame one block.
DEVICE_ERRNOS: frozenset[int] = frozenset(
    getattr(errno, name) for name in (
        "EIO", "ENOSPC", "EDQUOT", "EROFS", "ESHUTDOWN", "ENODEV", "ENXIO", "ESTALE", "ENOMEDIUM",
        "EUCLEAN", "EREMOTEIO", "ENOTCONN", "ETIMEDOUT", "ENOLINK", "EBADMSG",
    ) if hasattr(errno, name)
)


class TierIOError(StorageError):
    """A read or write of a tier file failed in the kernel (not a record that failed verification).

    ``operation`` is ``read`` or ``write``; ``offset`` and ``nbytes`` say where; ``errno`` is the
    kernel's error number (``None`` where a library reported no number). ``device_failed`` is True
    for :data:`DEVICE_ERRNOS` (the device or filesystem is failing, full or read-only: the next I/O
    to the file will likely fail too), False for an error of this call alone.
    """

    def __init__(self, path: str, operation: str, offset: int, nbytes: int, errno_: int | None, detail: str = "",
                 *, device_failed: bool | None = None) -> None:
        self.operation, self.offset, self.nbytes, self.errno = operation, offset, nbytes, errno_
        self.device_failed = (errno_ in DEVICE_ERRNOS) if device_failed is None else device_failed
        what = detail or (os.strerror(errno_) if errno_ is not None else "failed")
        code = f" ({errno.errorcode.get(errno_, errno_)})" if errno_ is not None else ""
        verdict = "; the device or filesystem is failing" if self.device_failed else ""
        super().__init__(path, f"{operation} of {nbytes} bytes at offset {offset} failed: {what}{code}{verdict}")

    @classmethod
    def from_os_error(cls, path: str, operation: str, offset: int, nbytes: int, exc: OSError) -> "TierIOError":
        return cls(path, operation, offset, nbytes, exc.errno, exc.strerror or str(exc))


@dataclass(frozen=True)
class RecoveryReport:
    """What a file-backed tier found in the file an earlier process left, at start.

    ``recovered`` records became readable again (:meth:`BlockFileStorage.recovered`). ``discarded``
    counts the records that were not, by reason (stable labels, usable as a metric label):
    ``torn_header`` (header checksum or magic wrong), ``uncommitted``, ``misplaced`` (stamped for
    another slot), ``unknown_checksum``, ``data_checksum`` (the block's bytes fail their checksum),
    ``read_error`` (the kernel failed the read), ``foreign`` (another namespace or layout: the whole
    file is started afresh) and ``superseded`` (an older copy of a key whose newer copy was kept:
    no data lost). ``recreated`` says why the file was started afresh ("" if it was not);
    ``bytes_verified`` and ``seconds`` measure the data pass.
    """

    path: str = ""
    recovered: int = 0
    discarded: Mapping[str, int] = field(default_factory=dict)
    recreated: str = ""
    bytes_verified: int = 0
    seconds: float = 0.0

    @property
    def lost(self) -> int:
        """Records whose data is gone (every reason but ``superseded``)."""
        return sum(n for reason, n in self.discarded.items() if reason != "superseded")


@dataclass(frozen=True)
class ReadCheck:
    """Verification of ``len(ok)`` records read together: ``ok[i]`` says record ``i`` may be used.

    ``reasons`` maps the position of each failed record to why it failed.
    """

    ok: np.ndarray
    reasons: dict[int, str] = field(default_factory=dict)

    @property
    def all_ok(self) -> bool:
        return bool(self.ok.all())


class StagingLanes:
    """``count`` lanes of ``records`` x ``record_bytes`` bytes each; a lane is held by one transfer.

    Host lanes are page-aligned (O_DIRECT reads and writes them in place) and pinned when
    ``device`` is a CUDA device; ``on_device=True`` places the lanes in device memory instead.
    """

    def __init__(self, count: int, records: int, record_bytes: int, *, device: torch.device | None,
                 on_device: bool = False, label: str = "staging") -> None:
        self.count, self.records, self.record_bytes = count, records, record_bytes
        nbytes = count * records * record_bytes
        self._memory: HostMemory | None = None
        if on_device:
            if device is None:
                raise StorageError(label, "device staging lanes need a device")
            flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
        else:
            self._memory = HostMemory(nbytes, device=device, unit_bytes=records * record_bytes, label=label)
            flat = self._memory.tensor
        self.pinned = bool(self._memory.pinned) if self._memory is not None else False
        self.tensor = flat.view(count, records, record_bytes)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for lane in range(count):
            self._free.put(lane)

    def acquire(self, timeout: float) -> int:
        """A free lane index; :class:`TimeoutError` when none frees up within ``timeout`` seconds."""
        try:
            return self._free.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no staging lane free within {timeout:.1f} s") from None

    def release(self, lane: int) -> None:
        self._free.put(lane)

    def lane(self, index: int) -> torch.Tensor:
        """Lane ``index`` as a ``[records, record_bytes]`` uint8 tensor."""
        return self.tensor[index]

    def close(self) -> None:
        self.tensor = torch.empty(0, dtype=torch.uint8)
        if self._memory is not None:
            self._memory.close()


class HostStorage(StorageTier):
    """A host-memory tier. ``slots`` is ``[num_slots, bytes_per_block]`` uint8, block-major.

    A single copy never spans two of ``segment_slots``-slot segments (each is registered with CUDA
    on its own). Only the first :attr:`ready_slots` slots may be used: a tier may return from its
    constructor with part of its pool usable and add the rest in the background.
    """

    level: ClassVar[TierLevel] = TierLevel.HOST
    pinned: bool
    segment_slots: int
    allocation: AllocationStats | None = None

    @property
    @abstractmethod
    def slots(self) -> torch.Tensor:
        """The pool: row ``s`` holds the block stored in slot ``s``."""

    @property
    def ready_slots(self) -> int:
        """Slots ``0 .. ready_slots - 1`` are usable now; the count never decreases.

        The transfer engine refuses an operation on a slot at or beyond it, and the leader allocates
        only below the smallest count of all ranks. A tier that allocates its whole pool before its
        constructor returns keeps this default, ``num_slots``.
        """
        return self.context.num_slots

    def wait_ready(self, slots: int, timeout: float) -> int:
        """Wait (at most ``timeout`` seconds) until ``slots`` slots are ready or the tier stops
        growing (complete, failed or closed); returns :attr:`ready_slots`."""
        return self.ready_slots


class BlockFileStorage(StorageTier):
    """A file-backed tier: slot ``s`` is one fixed-size record holding one block and its identity.

    Methods taking ``first_slot`` act on ``count`` consecutive slots (one I/O); ``keys`` is an
    ``[count, 2]`` uint64 array. They are called from the engine's worker threads, concurrently
    for disjoint slots.
    """

    level: ClassVar[TierLevel] = TierLevel.DISK
    #: Bytes of one record on disk (header + block + padding); see :meth:`bytes_per_slot`.
    record_bytes: int
    #: Consecutive records moved in one I/O, and the worker threads that should run I/O at once.
    io_records: int
    io_threads: int
    #: Host staging lanes (pinned on CUDA machines) of ``io_records`` records each.
    lanes: StagingLanes
    #: True when the tier moves data straight between the device and the file (GPUDirect).
    device_direct: bool = False
    #: Device staging lanes of ``io_records`` blocks each, when ``device_direct``.
    device_lanes: StagingLanes | None = None
    #: How the tier reaches the file, for logs and ``kvbm doctor`` (for example ``o_direct``).
    mode: str = ""

    @abstractmethod
    def recovered(self) -> tuple[np.ndarray, np.ndarray]:
        """Records found valid at start: ``(slots int64 [n], keys uint64 [n, 2])``."""

    def recovery_report(self) -> RecoveryReport:
        """What recovery found and discarded (counts by reason); empty for tiers that keep nothing."""
        return RecoveryReport(recovered=len(self.recovered()[0]))

    @abstractmethod
    def data_view(self, lane: torch.Tensor, count: int) -> torch.Tensor:
        """The block bytes of the first ``count`` records of a lane, ``[count, bytes_per_block]``."""

    @abstractmethod
    def write_lane(self, lane: torch.Tensor, first_slot: int, keys: np.ndarray) -> None:
        """Stamp and write the blocks already in ``data_view(lane, len(keys))``."""

    @abstractmethod
    def write_rows(self, rows: torch.Tensor, first_slot: int, keys: np.ndarray, lane: torch.Tensor) -> None:
        """Write ``rows`` (host ``[count, bytes_per_block]``); ``lane`` is scratch if they must be copied."""

    @abstractmethod
    def read_lane(self, lane: torch.Tensor, first_slot: int, keys: np.ndarray) -> ReadCheck:
        """Read records into a lane and verify each against its expected key.

        A record that fails verification is ``False`` in the result; a failed read raises
        :class:`TierIOError` (every record of the call failed).
        """

    def write_device(self, blocks: Sequence[torch.Tensor], first_slot: int, keys: np.ndarray) -> None:
        """Write device blocks straight to the file (``device_direct`` tiers only)."""
        raise NotImplementedError(f"tier {self.name!r} has no device-direct path")

    def read_device(self, staging: torch.Tensor, first_slot: int, keys: np.ndarray) -> ReadCheck:
        """Read blocks straight into device ``staging[:count]`` and verify them there."""
        raise NotImplementedError(f"tier {self.name!r} has no device-direct path")
