"""The local disk tier (G3): one preallocated, checksummed, restart-safe file per rank.

Slot ``s`` is record ``s`` of the file (:mod:`kvbm_tier_disk.format`); the file is exactly
``num_slots * record_bytes`` bytes. A record carries a 4096-byte header and the block padded to 4096,
so a slot takes :meth:`LocalDiskTier.bytes_per_slot` bytes, slightly more than ``bytes_per_block``;
the leader sizes ``num_slots`` with it, and the tier refuses to start if the file would exceed the
configured capacity (``capacity_gb`` / world size; an explicit block count is taken as asked).

The file lives in ``DYN_KVBM_DISK_CACHE_DIR`` or, when that is unset, in a private per-user
directory; it is opened so that no other user can have planted it or can reach it
(:mod:`kvbm_tier_disk.location`). At start the tier verifies the records a file left by an earlier
process of the same namespace and rank holds, headers and data (:mod:`kvbm_tier_disk.recovery`), and
reports the intact ones (:meth:`recovered`) and what it discarded, by reason
(:meth:`recovery_report`). Every read is verified before its bytes are used; a read or write the
kernel fails raises :class:`~kvbm_core.storage.base.TierIOError` naming the file. Options:
``io_threads`` (8), ``io_mb`` (bytes per I/O, 16) and ``lanes`` (staging lanes, 2 x io_threads).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import structlog
import torch

from kvbm_core.errors import StorageError
from kvbm_core.interfaces import CheckResult, TierContext
from kvbm_core.layout import BlockLayout
from kvbm_core.settings.model import KvbmSettings
from kvbm_core.storage import (
    BlockFileStorage,
    ReadCheck,
    RecoveryReport,
    StagingLanes,
    check_positive_int_options,
)
from kvbm_tier_disk.blockfile import BlockFile, fallocate, file_stem, open_block_file, recreate
from kvbm_tier_disk.format import HEADER_BYTES, ChecksumKind, RecordFormat, rank_namespace, record_bytes, xxh3_rows
from kvbm_tier_disk.location import open_directory
from kvbm_tier_disk.recovery import recover

log = structlog.get_logger("kvbm.tier.disk")

_OPTIONS = {"io_threads", "io_mb", "lanes"}


class LocalDiskTier(BlockFileStorage):
    name = "disk"
    read_gbps = 1.5
    write_gbps = 2.0

    @classmethod
    def bytes_per_slot(cls, layout: BlockLayout) -> int:
        return record_bytes(layout.bytes_per_block)

    def __init__(self, context: TierContext) -> None:
        super().__init__(context)
        self._file: BlockFile | None = None
        self.lanes = None  # type: ignore[assignment]
        options = context.spec.options
        self.validate_options(options, f"tiers.{self.name}.options")
        settings = context.settings or KvbmSettings()
        layout = context.layout
        self.bytes_per_block = layout.bytes_per_block
        self.format = RecordFormat(layout.bytes_per_block, rank_namespace(context.namespace, context.rank))
        self.record_bytes = self.format.record_bytes
        directory = settings.disk.directory or None  # None: a private per-user directory
        size = context.num_slots * self.record_bytes
        self._check_budget(size, directory or f"{self.name} tier")
        self._zerofill = settings.disk.zerofill_fallback
        self._file = open_block_file(directory, file_stem(context.namespace, context.rank), size,
                                     zerofill_fallback=self._zerofill,
                                     disable_o_direct=settings.disk.disable_o_direct)
        self.path = self._file.path
        self.mode = "o_direct" if self._file.direct else "buffered"
        self.io_threads = int(options.get("io_threads", 8))
        self.io_records = max(1, min(256, (int(options.get("io_mb", 16)) << 20) // self.record_bytes))
        self.lanes = StagingLanes(int(options.get("lanes", 2 * self.io_threads)), self.io_records,
                                  self.record_bytes, device=context.device,
                                  label=f"{self.name} tier staging rank {context.rank}")
        recovery = recover(self._file, self.format, context.num_slots, self.lanes, self.io_threads,
                           lambda: recreate(self._io(), self._zerofill))
        self._recovered = (recovery.slots, recovery.keys)
        self._report = recovery.report
        self._generation = itertools.count(recovery.next_generation)
        log.info("disk tier ready", path=self.path, rank=context.rank, slots=context.num_slots,
                 record_bytes=self.record_bytes, io=self.mode, recovered=len(recovery.slots))

    # ------------------------------------------------------------------------------- set-up
    def _check_budget(self, size: int, directory: str) -> None:
        spec, ctx = self.context.spec, self.context
        if spec.num_blocks is None and spec.capacity_gb is not None:
            budget = spec.capacity_gb * 1e9 / max(ctx.world_size, 1)
            if size > budget:
                raise StorageError(directory, (
                    f"{ctx.num_slots} slots x {self.record_bytes} bytes (header + block) = {size} bytes "
                    f"exceed the {self.name} tier's capacity of {budget:.0f} bytes per rank; size num_slots "
                    f"with the tier's bytes_per_slot ({self.record_bytes}), not bytes_per_block"))

    # -------------------------------------------------------------------------------- I/O
    def recovered(self) -> tuple[np.ndarray, np.ndarray]:
        return self._recovered

    def recovery_report(self) -> RecoveryReport:
        return self._report

    def data_view(self, lane: torch.Tensor, count: int) -> torch.Tensor:
        return lane[:count, HEADER_BYTES:HEADER_BYTES + self.bytes_per_block]

    def _generations(self, count: int) -> np.ndarray:
        return np.fromiter((next(self._generation) for _ in range(count)), dtype=np.uint64, count=count)

    def _stamp(self, lane: torch.Tensor, first_slot: int, keys: np.ndarray, checksums: np.ndarray,
               kind: ChecksumKind) -> None:
        k = len(keys)
        self.format.stamp(lane[:k, :HEADER_BYTES].numpy(), first_slot, keys, checksums, kind, self._generations(k))

    def write_lane(self, lane: torch.Tensor, first_slot: int, keys: np.ndarray) -> None:
        k = len(keys)
        self._stamp(lane, first_slot, keys, xxh3_rows(self.data_view(lane, k)), ChecksumKind.XXH3_64)
        if HEADER_BYTES + self.bytes_per_block < self.record_bytes:
            lane[:k, HEADER_BYTES + self.bytes_per_block:] = 0
        self._io().pwrite_all([memoryview(lane[:k].numpy()).cast("B")], self.format.offset(first_slot))

    def write_rows(self, rows: torch.Tensor, first_slot: int, keys: np.ndarray, lane: torch.Tensor) -> None:
        k = len(keys)
        in_place = (
            rows.device.type == "cpu"
            and rows.stride(1) == 1
            and self.bytes_per_block % 4096 == 0
            and rows.data_ptr() % 4096 == 0
            and rows.stride(0) % 4096 == 0
        )
        if not in_place:
            self.data_view(lane, k).copy_(rows)
            self.write_lane(lane, first_slot, keys)
            return
        self._stamp(lane, first_slot, keys, xxh3_rows(rows), ChecksumKind.XXH3_64)
        headers = lane[:k, :HEADER_BYTES].numpy()
        buffers: list[memoryview] = []
        for i in range(k):
            buffers += [memoryview(headers[i]), memoryview(rows[i].numpy())]
        self._io().pwrite_all(buffers, self.format.offset(first_slot))

    def read_lane(self, lane: torch.Tensor, first_slot: int, keys: np.ndarray) -> ReadCheck:
        k = len(keys)
        records = lane[:k].numpy()
        got = self._io().pread_into(memoryview(records).cast("B"), self.format.offset(first_slot))
        if got < records.nbytes:
            records.reshape(-1)[got:] = 0  # past the end of the file: nothing there, nothing verifies
        return self.format.verify(records[:, :HEADER_BYTES], self.data_view(lane, k), first_slot, keys)

    def _io(self) -> BlockFile:
        if self._file is None:
            raise StorageError(getattr(self, "path", self.name), "the tier is closed")
        return self._file

    # --------------------------------------------------------------------------- plumbing
    @classmethod
    def validate_options(cls, options: Mapping[str, Any], key: str) -> None:
        check_positive_int_options(options, key, _OPTIONS)

    @classmethod
    def diagnose(cls, spec: Any, settings: KvbmSettings) -> list[CheckResult]:
        return diagnose_directory(settings, spec)

    def close(self) -> None:
        if self.lanes is not None:
            self.lanes.close()
            self.lanes = None  # type: ignore[assignment]
        if self._file is not None:
            self._file.close()
            self._file = None


def diagnose_directory(settings: KvbmSettings, spec: Any) -> list[CheckResult]:
    """``kvbm doctor`` checks of the disk cache directory: safe from other users, writable, free space,
    fallocate, O_DIRECT. The private default directory is created if missing, as the tier would."""
    try:
        opened = open_directory(settings.disk.directory or None)
    except StorageError as exc:
        return [CheckResult("disk directory", "fail", str(exc))]
    opened.close()
    directory = opened.path
    checks: list[CheckResult] = []
    try:
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".kvbm-probe-")
    except OSError as exc:
        return [CheckResult("disk directory", "fail", f"{directory}: {exc.strerror or exc}")]
    with probe:
        checks.append(CheckResult("disk directory", "pass", f"{directory} is writable and no other user can "
                                                            f"replace files in it"))
        vfs = os.statvfs(directory)
        free = vfs.f_bavail * vfs.f_frsize
        capacity = (spec.capacity_gb or 0) * 1e9 if spec is not None else 0
        checks.append(CheckResult("disk free space", "pass" if free >= capacity else "fail",
                                  f"{free / 1e9:.1f} GB free, {capacity / 1e9:.1f} GB configured"))
        err = fallocate(probe.fileno(), 1 << 20)
        if err == 0:
            checks.append(CheckResult("disk fallocate", "pass", "supported"))
        else:
            status = "warn" if settings.disk.zerofill_fallback else "fail"
            checks.append(CheckResult("disk fallocate", status, f"{os.strerror(err)}; zero-fill fallback "
                                      f"{'on' if settings.disk.zerofill_fallback else 'off'}"))
        try:
            fd = os.open(probe.name, os.O_RDONLY | os.O_DIRECT)
            os.close(fd)
            checks.append(CheckResult("disk O_DIRECT", "pass", "supported"))
        except OSError as exc:
            checks.append(CheckResult("disk O_DIRECT", "warn", f"refused ({exc.strerror}): buffered I/O"))
    return checks
