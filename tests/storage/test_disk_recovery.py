"""Start-up recovery checks each record's data, not only its header, and says what it discarded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from structlog.testing import capture_logs

from kvbm_tier_disk import LocalDiskTier
from kvbm_tier_disk.format import FLAG_COMMITTED, HEADER_BYTES, HEADER_DTYPE, record_bytes

from tierkit import LAYOUT, ODD_LAYOUT, make_context

BPB = LAYOUT.bytes_per_block


def _keys(n: int, base: int = 1) -> np.ndarray:
    return (np.arange(2 * n, dtype=np.uint64) + np.uint64(base)).reshape(n, 2)


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


def _flip(path: str, offset: int, bit: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ bit]))


def _recovery_lines(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["event"].startswith("disk tier recovery")]


@pytest.mark.parametrize("layout", [LAYOUT, ODD_LAYOUT], ids=["aligned", "padded"])
def test_flipped_data_bits_are_discarded_at_recovery_never_promised(tmp_path: Path, layout) -> None:
    tier = LocalDiskTier(make_context("disk", 16, tmp_path, layout=layout))
    keys = _keys(10)
    rows = _write(tier, 0, keys)
    tier.close()
    record = record_bytes(layout.bytes_per_block)
    bad = [1, 4, 9]
    for slot, where in zip(bad, (0, 777, layout.bytes_per_block - 1)):  # first, middle and last data byte
        _flip(tier.path, slot * record + HEADER_BYTES + where)

    with capture_logs() as logs:
        again = LocalDiskTier(make_context("disk", 16, tmp_path, layout=layout))
    slots, found = again.recovered()
    good = [s for s in range(10) if s not in bad]
    assert slots.tolist() == good and (found == keys[good]).all()
    report = again.recovery_report()
    assert report.recovered == 7 and dict(report.discarded) == {"data_checksum": 3} and report.lost == 3
    assert report.bytes_verified == 10 * record and report.path == again.path
    (line,) = _recovery_lines(logs)
    assert line["log_level"] == "warning" and line["discarded"] == {"data_checksum": 3} and line["path"] == again.path
    ok, data = _read(again, 5, keys[5:9])  # the intact ones around them serve as before
    assert ok.all() and torch.equal(data, rows[5:9])
    again.close()


def test_every_reason_is_counted_in_one_summary_line(tmp_path: Path) -> None:
    tier = LocalDiskTier(make_context("disk", 16, tmp_path))
    keys = _keys(8)
    _write(tier, 0, keys)
    _write(tier, 10, keys[7:8], seed=1)  # a newer copy of slot 7's key: slot 7 is superseded
    fmt, record = tier.format, tier.record_bytes
    tier.close()
    with open(tier.path, "r+b") as f:
        f.seek(0 * record)
        copy = f.read(record)
        f.seek(12 * record)
        f.write(copy)  # slot 0's record in slot 12: misplaced
        f.seek(2 * record)
        header = np.frombuffer(bytearray(f.read(HEADER_DTYPE.itemsize)), dtype=np.uint8).copy()
        h = header.view(HEADER_DTYPE)[0]
        h["flags"] &= ~np.uint32(FLAG_COMMITTED)  # slot 2: a header that was never committed
        h["header_checksum"] = xxhash.xxh3_64_intdigest(header[: HEADER_DTYPE.itemsize - 8])
        f.seek(2 * record)
        f.write(header.tobytes())
    _flip(tier.path, 3 * record + 40)  # slot 3: torn header (the key)
    _flip(tier.path, 5 * record + HEADER_BYTES + 9)  # slot 5: data
    with capture_logs() as logs:
        again = LocalDiskTier(make_context("disk", 16, tmp_path))
    assert again.recovered()[0].tolist() == [0, 1, 4, 6, 10]
    assert dict(again.recovery_report().discarded) == {
        "misplaced": 1, "uncommitted": 1, "torn_header": 1, "data_checksum": 1, "superseded": 1}
    assert again.recovery_report().lost == 4
    (line,) = _recovery_lines(logs)
    assert line["discarded"] == dict(again.recovery_report().discarded) and line["recovered"] == 5
    assert fmt.record_bytes == record
    again.close()


def test_a_clean_recovery_logs_one_info_line_with_nothing_discarded(tmp_path: Path) -> None:
    tier = LocalDiskTier(make_context("disk", 8, tmp_path))
    _write(tier, 2, _keys(3))
    tier.close()
    with capture_logs() as logs:
        again = LocalDiskTier(make_context("disk", 8, tmp_path))
    (line,) = _recovery_lines(logs)
    assert line["log_level"] == "info" and line["recovered"] == 3 and line["discarded"] == {}
    report = again.recovery_report()
    assert report.discarded == {} and report.lost == 0 and report.recreated == ""
    again.close()


def test_new_writes_after_recovery_win_over_discarded_records(tmp_path: Path) -> None:
    """Generations continue above every record in the file, even one that failed its checksum, so a
    later restart keeps the new copy of a key."""
    tier = LocalDiskTier(make_context("disk", 8, tmp_path))
    for _ in range(5):
        _write(tier, 0, _keys(1, 50))  # slot 0 reaches a high generation
    tier.close()
    _flip(tier.path, HEADER_BYTES + 3)
    again = LocalDiskTier(make_context("disk", 8, tmp_path))
    assert len(again.recovered()[0]) == 0
    rows = _write(again, 4, _keys(1, 50), seed=7)
    again.close()
    third = LocalDiskTier(make_context("disk", 8, tmp_path))
    assert third.recovered()[0].tolist() == [4]
    ok, data = _read(third, 4, _keys(1, 50))
    assert ok.all() and torch.equal(data, rows)
    third.close()


def test_foreign_file_is_reported(tmp_path: Path) -> None:
    other = LocalDiskTier(make_context("disk", 8, tmp_path / "a", namespace=b"\x01" * 16))
    _write(other, 0, _keys(3))
    other.close()
    (tmp_path / "b").mkdir(mode=0o700)
    target = tmp_path / "b" / Path(LocalDiskTier(make_context("disk", 8, tmp_path / "probe")).path).name
    target.write_bytes(Path(other.path).read_bytes())
    target.chmod(0o600)
    with capture_logs() as logs:
        tier = LocalDiskTier(make_context("disk", 8, tmp_path / "b"))
    report = tier.recovery_report()
    assert report.recreated and dict(report.discarded) == {"foreign": 3} and report.recovered == 0
    (line,) = _recovery_lines(logs)
    assert line["log_level"] == "warning" and "another namespace" in line["event"]
    tier.close()


def test_wrong_size_file_is_reported(tmp_path: Path) -> None:
    tier = LocalDiskTier(make_context("disk", 8, tmp_path))
    _write(tier, 0, _keys(2))
    tier.close()
    again = LocalDiskTier(make_context("disk", 6, tmp_path))
    assert "wrong size" in again.recovery_report().recreated and again.recovery_report().recovered == 0
    again.close()
