"""A failing disk is told apart from a bad block, and every I/O error names the file.

A block that fails verification is a ``False`` in the read's :class:`ReadCheck` (the others serve);
a read or write the kernel fails raises :class:`TierIOError` with ``device_failed`` set for errors
that mean the device or filesystem is failing. The failing filesystem here is a real ext4, shut
down with ``EXT4_IOC_SHUTDOWN`` as the kernel does when the device under it dies.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kvbm_core.errors import StorageError
from kvbm_core.interfaces import TierLevel
from kvbm_core.ops import Route, StepOps
from kvbm_core.storage.base import DEVICE_ERRNOS, TierIOError
from kvbm_core.worker import TransferEngine
from kvbm_tier_disk import LocalDiskTier
from kvbm_tier_disk.format import HEADER_BYTES

from tierkit import LAYOUT, make_context, stage

BPB = LAYOUT.bytes_per_block
EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def _keys(n: int, base: int = 1) -> np.ndarray:
    return (np.arange(2 * n, dtype=np.uint64) + np.uint64(base)).reshape(n, 2)


def _shut_down(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    except OSError as exc:
        pytest.skip(f"this kernel cannot shut an ext4 filesystem down: {exc}")
    finally:
        os.close(fd)


@pytest.fixture
def ext4(mount) -> Path:
    return mount("ext4", image_mb=32, mkfs=["mkfs.ext4", "-q", "-F"])


def _store(tier: LocalDiskTier, pool: torch.Tensor, slots: np.ndarray, keys: np.ndarray):
    """Device blocks ``0..n`` -> disk ``slots``, through the transfer engine."""
    engine = TransferEngine(pool, LAYOUT, {TierLevel.DISK: tier}, rank=0)
    step = StepOps.build(0, [(1, Route.D2DISK, 0, np.arange(len(slots)), slots, keys)])
    engine.start_stores(step.select({Route.D2DISK}), None)
    (result,) = engine.drain(30)
    engine.close()
    return result


def test_failing_filesystem_raises_device_errors_that_name_the_file(ext4: Path) -> None:
    tier = LocalDiskTier(make_context("disk", 8, ext4))
    pool = torch.randint(0, 256, (4, BPB), dtype=torch.uint8)
    assert _store(tier, pool, np.arange(4), _keys(4)).ok
    _shut_down(ext4)

    lane = tier.lanes.lane(tier.lanes.acquire(1.0))
    with pytest.raises(TierIOError) as read:
        tier.read_lane(lane, 0, _keys(4))
    with pytest.raises(TierIOError) as write:
        tier.write_rows(pool[:2], 4, _keys(2, 100), lane)
    for info, operation in ((read, "read"), (write, "write")):
        exc = info.value
        assert exc.device_failed and exc.errno == errno.EIO and exc.operation == operation
        assert exc.path == tier.path and str(exc).startswith(tier.path)
        assert "EIO" in str(exc) and "device or filesystem is failing" in str(exc)
    tier.close()


def test_engine_reports_a_failing_device_apart_from_a_bad_block(ext4: Path) -> None:
    tier = LocalDiskTier(make_context("disk", 8, ext4))
    pool = torch.randint(0, 256, (4, BPB), dtype=torch.uint8)
    assert _store(tier, pool, np.arange(4), _keys(4)).ok
    with open(tier.path, "r+b") as f:  # one bad block: a flipped bit in slot 1's data
        f.seek(tier.record_bytes + HEADER_BYTES + 11)
        b = f.read(1)[0]
        f.seek(tier.record_bytes + HEADER_BYTES + 11)
        f.write(bytes([b ^ 4]))
    bad_block, out = stage(tier, np.arange(4), _keys(4))
    assert not bad_block.ok and bad_block.failed_blocks == (1,) and "checksum mismatch" in bad_block.error
    assert torch.equal(out[[0, 2, 3]], pool[[0, 2, 3]])  # the rest of the read served

    _shut_down(ext4)
    failing, _ = stage(tier, np.arange(4), _keys(4))
    assert not failing.ok and failing.failed_blocks == (0, 1, 2, 3)
    assert "TierIOError" in failing.error and tier.path in failing.error
    assert "device or filesystem is failing" in failing.error
    tier.close()


def test_restart_on_a_failed_filesystem_is_a_clear_error_naming_the_file(ext4: Path) -> None:
    tier = LocalDiskTier(make_context("disk", 8, ext4))
    path = tier.path
    tier.close()
    _shut_down(ext4)
    with pytest.raises(StorageError) as info:
        LocalDiskTier(make_context("disk", 8, ext4))
    assert path in str(info.value) and "Input/output error" in str(info.value)


def test_an_error_of_one_call_is_not_a_device_failure(tmp_path: Path) -> None:
    tier = LocalDiskTier(make_context("disk", 4, tmp_path))
    page = memoryview(mmap.mmap(-1, 4096))
    with pytest.raises(TierIOError) as info:
        tier._io().pread_into(page, -4096)  # the kernel refuses a negative offset: EINVAL
    assert info.value.errno == errno.EINVAL and not info.value.device_failed
    assert info.value.path == tier.path and "device" not in str(info.value)
    assert {errno.EIO, errno.ENOSPC, errno.EROFS, errno.ESHUTDOWN} <= DEVICE_ERRNOS
    assert errno.EINVAL not in DEVICE_ERRNOS
    tier.close()
