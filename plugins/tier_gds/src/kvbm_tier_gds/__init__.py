"""kvbm-tier-gds: GPUDirect Storage through kvikio (G3), in the disk tier's on-disk format.

The file, its preallocation, recovery and record format are the disk tier's (this tier subclasses
:class:`~kvbm_tier_disk.LocalDiskTier`), so either tier reads what the other wrote. What changes is
the data path: block bytes move between device memory and the file through kvikio, with no host
bounce of ours.

- Write: the block's WSUM64 checksum is computed on the GPU (one torch reduction), the header is
  written from host memory, the block from device memory.
- Read: the header comes to the host, the block into a device staging lane; the block is verified
  there (WSUM64 on the GPU; an XXH3 record written by the disk tier is copied back to the host and
  hashed) and only verified blocks are copied into the KV pool.

Modes (:attr:`mode`, and ``diagnose`` for ``kvbm doctor``): ``gds`` (cuFile with the nvidia-fs
driver), ``kvikio-compat`` (kvikio's POSIX compatibility mode: no driver), ``host-bounce`` (no kvikio
or no CUDA: the disk tier's pinned bounce path). Anything but ``gds`` is logged once as a warning.
kvikio is imported lazily here and nowhere else.
"""

from __future__ import annotations

import glob
import importlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import structlog
import torch

from kvbm_core.errors import StorageError
from kvbm_core.hookspecs import hookimpl
from kvbm_core.interfaces import CheckResult, TierContext
from kvbm_core.settings.model import KvbmSettings
from kvbm_core.storage import ReadCheck, StagingLanes, TierIOError
from kvbm_tier_disk import LocalDiskTier
from kvbm_tier_disk.format import HEADER_BYTES, ChecksumKind, wsum64_rows, xxh3_rows
from kvbm_tier_disk.location import is_same_file
from kvbm_tier_disk.tier import diagnose_directory

log = structlog.get_logger("kvbm.tier.gds")


def _import_kvikio() -> Any | None:
    try:
        return importlib.import_module("kvikio")
    except Exception:  # not installed, or its CUDA libraries do not load here
        return None


def _nvidia_fs_present() -> bool:
    return os.path.exists("/proc/driver/nvidia-fs/stats") or bool(glob.glob("/dev/nvidia-fs*"))


def probe_mode(kvikio: Any | None) -> tuple[str, str]:
    """``(mode, detail)`` this machine allows; see the module docstring for the modes."""
    if not torch.cuda.is_available():
        return "host-bounce", "no CUDA device"
    if kvikio is None:
        return "host-bounce", "kvikio is not installed (pip install kvbm-tier-gds[kvikio])"
    try:
        compat = bool(kvikio.defaults.is_compat_mode_preferred())
    except Exception:  # a kvikio without the query: assume the conservative answer
        compat = True
    driver = _nvidia_fs_present()
    if compat or not driver:
        why = "no nvidia-fs driver" if not driver else "kvikio prefers compatibility mode (KVIKIO_COMPAT_MODE)"
        return "kvikio-compat", f"{why}: kvikio moves the bytes through POSIX I/O and its own bounce buffers"
    return "gds", "cuFile with the nvidia-fs driver"


class GdsTier(LocalDiskTier):
    name = "gds"
    read_gbps = 1.6
    write_gbps = 2.2

    def __init__(self, context: TierContext) -> None:
        self._cufile: Any = None
        super().__init__(context)
        device = context.device
        kvikio = _import_kvikio() if device is not None and device.type == "cuda" else None
        self.mode, detail = probe_mode(kvikio) if device is not None and device.type == "cuda" else (
            "host-bounce", "no CUDA device for this rank")
        if self.mode != "host-bounce" and self.bytes_per_block % 8 == 0:
            try:  # kvikio runs one thread by default; our I/O threads each wait on their own reads
                kvikio.defaults.set("num_threads", self.io_threads)
            except Exception as exc:
                log.warning("could not raise kvikio's thread count", error=str(exc))
            self._cufile = kvikio.CuFile(self.path, "r+")  # kvikio opens by path: check it is our file
            if not is_same_file(self._io().directory, self._io().name, self._io().lock_fd):
                self._cufile.close()
                raise StorageError(self.path, "the tier file was replaced while kvikio opened it")
            self.device_lanes = StagingLanes(self.io_threads, self.io_records, self.bytes_per_block,
                                             device=device, on_device=True, label="gds staging")
            self.device_direct = True
        elif self.mode != "host-bounce":
            self.mode, detail = "host-bounce", f"block size {self.bytes_per_block} is not a multiple of 8"
        if self.mode != "gds":
            log.warning("GPUDirect Storage is not available: the gds tier runs in a fallback mode",
                        mode=self.mode, detail=detail, path=self.path)

    # ------------------------------------------------------------------------- device path
    def write_device(self, blocks: Sequence[torch.Tensor], first_slot: int, keys: np.ndarray) -> None:
        k = len(keys)
        sums = np.concatenate([wsum64_rows(b.view(1, -1)) for b in blocks])
        lane_index = self.lanes.acquire(timeout=60.0)
        try:
            lane = self.lanes.lane(lane_index)
            self._stamp(lane, first_slot, keys, sums, ChecksumKind.WSUM64)
            headers = lane[:k, :HEADER_BYTES].numpy()
            io = self._io()
            futures = [self._cufile.pwrite(blocks[i], self.bytes_per_block,
                                           self.format.offset(first_slot + i) + HEADER_BYTES) for i in range(k)]
            try:
                for i in range(k):
                    io.pwrite_all([memoryview(headers[i])], self.format.offset(first_slot + i))
            except BaseException:
                _wait_quietly(futures)  # the device blocks must not be reused while kvikio still reads them
                raise
            written = _kvikio_results(futures, self.path, "write", self.format.offset(first_slot),
                                      k * self.record_bytes)
        finally:
            self.lanes.release(lane_index)
        if any(n != self.bytes_per_block for n in written):
            raise TierIOError(self.path, "write", self.format.offset(first_slot), k * self.record_bytes, None,
                              f"short GPUDirect write ({written} of {self.bytes_per_block} bytes per block)",
                              device_failed=True)

    def read_device(self, staging: torch.Tensor, first_slot: int, keys: np.ndarray) -> ReadCheck:
        k = len(keys)
        lane_index = self.lanes.acquire(timeout=60.0)
        try:
            lane = self.lanes.lane(lane_index)
            futures = [self._cufile.pread(staging[i], self.bytes_per_block,
                                          self.format.offset(first_slot + i) + HEADER_BYTES) for i in range(k)]
            headers = lane[:k, :HEADER_BYTES].numpy()
            io = self._io()
            try:
                for i in range(k):
                    if io.pread_into(memoryview(headers[i]), self.format.offset(first_slot + i)) != HEADER_BYTES:
                        headers[i] = 0
            except BaseException:
                _wait_quietly(futures)  # the staging lane must not be released while kvikio still fills it
                raise
            got = _kvikio_results(futures, self.path, "read", self.format.offset(first_slot), k * self.record_bytes)
            h, ok, reasons = self.format.check_headers(headers, first_slot, keys)
            for i, n in enumerate(got):
                if n != self.bytes_per_block and ok[i]:
                    ok[i] = False
                    reasons[i] = f"slot {first_slot + i}: short read ({n} bytes)"
            rows = np.flatnonzero(ok)
            if rows.size:
                device_rows = staging[torch.from_numpy(rows).to(staging.device)]
                sums = np.where(
                    h["checksum_kind"][rows] == int(ChecksumKind.WSUM64),
                    wsum64_rows(device_rows),
                    self._host_xxh3(device_rows, lane, rows, h),
                )
                for i in rows[sums != h["checksum"][rows]]:
                    ok[i] = False
                    reasons[int(i)] = f"slot {first_slot + int(i)}: block checksum mismatch (torn or corrupted)"
        finally:
            self.lanes.release(lane_index)
        return ReadCheck(ok, reasons)

    def _host_xxh3(self, device_rows: torch.Tensor, lane: torch.Tensor, rows: np.ndarray, h: np.ndarray) -> np.ndarray:
        """XXH3 records (written by the disk tier) are hashed on the host: copy them back first."""
        need = h["checksum_kind"][rows] == int(ChecksumKind.XXH3_64)
        out = np.zeros(len(rows), dtype=np.uint64)
        if need.any():
            picked = np.flatnonzero(need)
            host = self.data_view(lane, len(picked))
            host.copy_(device_rows[torch.from_numpy(picked).to(device_rows.device)])
            out[picked] = xxh3_rows(host)
        return out

    # ---------------------------------------------------------------------------- plumbing
    @classmethod
    def diagnose(cls, spec: Any, settings: KvbmSettings) -> list[CheckResult]:
        mode, detail = probe_mode(_import_kvikio())
        status = "pass" if mode == "gds" else "warn"
        return [CheckResult("gds mode", status, f"{mode}: {detail}"), *diagnose_directory(settings, spec)]

    def close(self) -> None:
        if self._cufile is not None:
            self._cufile.close()
            self._cufile = None
        if self.device_lanes is not None:
            self.device_lanes.close()
            self.device_lanes = None
        super().close()


def _kvikio_results(futures: list[Any], path: str, operation: str, offset: int, nbytes: int) -> list[int]:
    """Wait for kvikio I/O futures; a failure becomes a :class:`TierIOError` naming the file.

    kvikio reports most failures without an errno (``RuntimeError``): those are not classified as
    device failures (``device_failed`` False) unless the errno says so.
    """
    try:
        return [int(f.get()) for f in futures]
    except Exception as exc:
        raise TierIOError(path, operation, offset, nbytes, getattr(exc, "errno", None),
                          f"GPUDirect {operation} failed: {exc}") from exc


def _wait_quietly(futures: list[Any]) -> None:
    for f in futures:
        try:
            f.get()
        except Exception:  # the error being raised already says what failed
            pass


@hookimpl
def kvbm_tier_types():
    return [GdsTier]


__all__ = ["GdsTier", "probe_mode"]
