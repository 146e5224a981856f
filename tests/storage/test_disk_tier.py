"""The disk tier's file: naming, preallocation, recovery, and each start-up failure on a real filesystem."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from kvbm_core.errors import StorageError
from kvbm_tier_disk import LocalDiskTier
from kvbm_tier_disk.blockfile import file_stem
from kvbm_tier_disk.format import HEADER_BYTES, record_bytes

from tierkit import LAYOUT, NAMESPACE, ODD_LAYOUT, make_context

BPB = LAYOUT.bytes_per_block


def _write(tier: LocalDiskTier, first_slot: int, keys: np.ndarray, seed: int = 0) -> torch.Tensor:
    rows = torch.randint(0, 256, (len(keys), tier.bytes_per_block), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))
    lane = tier.lanes.acquire(1.0)
    try:
        tier.write_rows(rows, first_slot, keys, tier.lanes.lane(lane))
    finally:
        tier.lanes.release(lane)
    return rows


def _read(tier: LocalDiskTier, first_slot: int, keys: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    lane = tier.lanes.acquire(1.0)
    try:
        check = tier.read_lane(tier.lanes.lane(lane), first_slot, keys)
        return check.ok, tier.data_view(tier.lanes.lane(lane), len(keys)).clone()
    finally:
        tier.lanes.release(lane)


def _keys(n: int, base: int = 0) -> np.ndarray:
    return (np.arange(2 * n, dtype=np.uint64) + np.uint64(base)).reshape(n, 2)


def test_file_is_named_sized_and_preallocated(tmp_path: Path) -> None:
    tier = LocalDiskTier(make_context("disk", 20, tmp_path))
    expected = tmp_path / f"kvbm-{NAMESPACE.hex()}-rank0.blocks"
    assert tier.path == str(expected) and file_stem(NAMESPACE, 0) == expected.name.removesuffix(".blocks")
    st = os.stat(expected)
    assert st.st_size == 20 * record_bytes(BPB) == 20 * LocalDiskTier.bytes_per_slot(LAYOUT)
    assert st.st_blocks * 512 >= st.st_size  # real blocks, not a sparse file
    assert tier.mode == "o_direct"
    tier.close()


@pytest.mark.parametrize("layout", [LAYOUT, ODD_LAYOUT], ids=["aligned", "padded"])
def test_round_trip_and_recovery_after_reopen(tmp_path: Path, layout) -> None:
    tier = LocalDiskTier(make_context("disk", 16, tmp_path, layout=layout))
    rows = _write(tier, 3, _keys(5))
    ok, data = _read(tier, 3, _keys(5))
    assert ok.all() and torch.equal(data, rows)
    tier.close()

    again = LocalDiskTier(make_context("disk", 16, tmp_path, layout=layout))
    slots, keys = again.recovered()
    assert slots.tolist() == [3, 4, 5, 6, 7] and (keys == _keys(5)).all()
    ok, data = _read(again, 3, _keys(5))
    assert ok.all() and torch.equal(data, rows)
    again.close()


def test_newest_copy_of_a_key_wins_at_recovery(tmp_path: Path) -> None:
    tier = LocalDiskTier(make_context("disk", 8, tmp_path))
    _write(tier, 1, _keys(1, 100), seed=1)
    _write(tier, 6, _keys(1, 100), seed=2)
    tier.close()
    again = LocalDiskTier(make_context("disk", 8, tmp_path))
    slots, keys = again.recovered()
    assert slots.tolist() == [6] and (keys == _keys(1, 100)).all()
    again.close()


def test_flipped_bit_on_disk_fails_that_block_only(tmp_path: Path) -> None:
    tier = LocalDiskTier(make_context("disk", 8, tmp_path))
    rows = _write(tier, 0, _keys(3))
    with open(tier.path, "r+b") as f:
        offset = 1 * tier.record_bytes + HEADER_BYTES + 777
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))
    ok, data = _read(tier, 0, _keys(3))
    assert ok.tolist() == [True, False, True]
    assert torch.equal(data[0], rows[0]) and torch.equal(data[2], rows[2])
    tier.close()


def test_truncated_file_is_recreated(tmp_path: Path) -> None:
    tier = LocalDiskTier(make_context("disk", 8, tmp_path))
    _write(tier, 0, _keys(4))
    path = tier.path
    tier.close()
    with open(path, "r+b") as f:
        f.truncate(3 * record_bytes(BPB) + 100)
    with capture_logs() as logs:
        again = LocalDiskTier(make_context("disk", 8, tmp_path))
    assert any("wrong size" in e["event"] for e in logs)
    assert os.path.getsize(path) == 8 * record_bytes(BPB) and len(again.recovered()[0]) == 0
    assert not _read(again, 0, _keys(4))[0].any()
    again.close()


def test_foreign_file_is_recreated_never_served(tmp_path: Path) -> None:
    other_dir = tmp_path / "other"
    foreign = LocalDiskTier(make_context("disk", 8, other_dir, namespace=b"\xee" * 16))
    _write(foreign, 0, _keys(4))
    foreign.close()
    ours = tmp_path / "ours"
    ours.mkdir()
    target = ours / f"kvbm-{NAMESPACE.hex()}-rank0.blocks"
    shutil.copyfile(foreign.path, target)  # a file of another model under our name
    target.chmod(0o600)  # private, as kvbm makes its files: only the namespace is wrong
    with capture_logs() as logs:
        tier = LocalDiskTier(make_context("disk", 8, ours))
    assert any("another namespace" in e["event"] for e in logs)
    assert len(tier.recovered()[0]) == 0 and not _read(tier, 0, _keys(4))[0].any()
    tier.close()


def test_other_rank_never_reads_this_ranks_records(tmp_path: Path) -> None:
    tier = LocalDiskTier(make_context("disk", 4, tmp_path, rank=0))
    _write(tier, 0, _keys(1))
    tier.close()
    shutil.copyfile(tier.path, tmp_path / f"kvbm-{NAMESPACE.hex()}-rank1.blocks")
    (tmp_path / f"kvbm-{NAMESPACE.hex()}-rank1.blocks").chmod(0o600)
    other = LocalDiskTier(make_context("disk", 4, tmp_path, rank=1))
    assert len(other.recovered()[0]) == 0
    other.close()


def test_second_live_process_gets_its_own_file(tmp_path: Path) -> None:
    first = LocalDiskTier(make_context("disk", 4, tmp_path))
    second = LocalDiskTier(make_context("disk", 4, tmp_path))
    assert second.path.endswith("-rank0.1.blocks") and first.path != second.path
    second.close()
    first.close()


def test_capacity_budget_counts_the_record_header(tmp_path: Path) -> None:
    capacity_gb = 10 * BPB / 1e9  # ten blocks' worth of bytes: ten records do not fit
    with pytest.raises(StorageError, match="bytes_per_slot"):
        LocalDiskTier(make_context("disk", 10, tmp_path, capacity_gb=capacity_gb))
    fits = int(capacity_gb * 1e9 // record_bytes(BPB))
    tier = LocalDiskTier(make_context("disk", fits, tmp_path, capacity_gb=capacity_gb))
    assert os.path.getsize(tier.path) <= capacity_gb * 1e9
    tier.close()


def test_directory_under_a_regular_file_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(StorageError, match="DYN_KVBM_DISK_CACHE_DIR") as info:
        LocalDiskTier(make_context("disk", 4, blocker / "cache"))
    assert str(blocker / "cache") in str(info.value)


def test_read_only_filesystem_is_a_clear_error(mount) -> None:
    target = mount("tmpfs", "ro,size=4m")
    with pytest.raises(StorageError, match="DYN_KVBM_DISK_CACHE_DIR") as info:
        LocalDiskTier(make_context("disk", 4, target))
    assert str(target) in str(info.value) and "Read-only" in str(info.value)


def test_more_than_the_free_space_fails_at_start(tmp_path: Path) -> None:
    vfs = os.statvfs(tmp_path)
    slots = (vfs.f_bavail * vfs.f_frsize) // record_bytes(BPB) + 1000
    with pytest.raises(StorageError, match="free") as info:
        LocalDiskTier(make_context("disk", slots, tmp_path))
    assert str(tmp_path) in str(info.value)
    assert not list(tmp_path.iterdir())  # no file left behind


def test_small_filesystem_fails_at_start(mount) -> None:
    target = mount("tmpfs", "size=1m")
    with pytest.raises(StorageError, match="free"):
        LocalDiskTier(make_context("disk", 200, target))  # 200 x 12 KiB > 1 MiB


def test_o_direct_refused_falls_back_with_a_log_line(mount) -> None:
    target = mount("ramfs")  # ramfs refuses O_DIRECT (and has no fallocate)
    with capture_logs() as logs:
        tier = LocalDiskTier(make_context("disk", 6, target, zerofill=True))
    assert tier.mode == "buffered"
    assert any("refuses O_DIRECT" in e["event"] for e in logs)
    rows = _write(tier, 1, _keys(2))
    ok, data = _read(tier, 1, _keys(2))
    assert ok.all() and torch.equal(data, rows)
    tier.close()


def test_disable_o_direct_forces_buffered_io(tmp_path: Path) -> None:
    tier = LocalDiskTier(make_context("disk", 4, tmp_path, disable_o_direct=True))
    assert tier.mode == "buffered"
    tier.close()


@pytest.fixture(params=["ramfs", "ext4-no-extents"])
def no_fallocate_dir(request, mount) -> Path:
    if request.param == "ramfs":
        return mount("ramfs")
    return mount("ext4", image_mb=32, mkfs=["mkfs.ext4", "-q", "-F", "-O", "^extent,^has_journal,^64bit"])


def test_fallocate_unsupported_without_zerofill_is_a_clear_error(no_fallocate_dir: Path) -> None:
    with pytest.raises(StorageError, match="DYN_KVBM_DISK_ZEROFILL_FALLBACK"):
        LocalDiskTier(make_context("disk", 8, no_fallocate_dir))
    assert not [p for p in no_fallocate_dir.iterdir() if p.suffix == ".blocks"]


def test_fallocate_unsupported_with_zerofill_allocates_every_block(no_fallocate_dir: Path) -> None:
    with capture_logs() as logs:
        tier = LocalDiskTier(make_context("disk", 8, no_fallocate_dir, zerofill=True))
    assert any("zero-filling" in e["event"] for e in logs)
    st = os.stat(tier.path)
    assert st.st_size == 8 * record_bytes(BPB) and st.st_blocks * 512 >= st.st_size
    rows = _write(tier, 0, _keys(8))
    tier.close()
    again = LocalDiskTier(make_context("disk", 8, no_fallocate_dir, zerofill=True))
    assert len(again.recovered()[0]) == 8  # a zero-filled file is reused, not zero-filled again
    ok, data = _read(again, 0, _keys(8))
    assert ok.all() and torch.equal(data, rows)
    again.close()


def test_diagnose_reports_the_directory(tmp_path: Path) -> None:
    ctx = make_context("disk", 4, tmp_path)
    checks = {c.name: c for c in LocalDiskTier.diagnose(ctx.spec, ctx.settings)}
    assert checks["disk directory"].status == "pass" and checks["disk fallocate"].status == "pass"
    assert checks["disk O_DIRECT"].status == "pass"
