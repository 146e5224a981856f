"""The GDS tier without GPUDirect (this machine): a loud fallback, and the disk tier's format both ways."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from structlog.testing import capture_logs

from kvbm_core.interfaces import TierLevel
from kvbm_core.ops import Route, StepOps
from kvbm_core.worker import TransferEngine
from kvbm_tier_disk import LocalDiskTier
from kvbm_tier_disk.format import HEADER_BYTES, ChecksumKind, wsum64_rows
from kvbm_tier_gds import GdsTier, probe_mode

from tierkit import LAYOUT, make_context, stage

BPB = LAYOUT.bytes_per_block


def _store_then_load(tier, pool: torch.Tensor, slots: np.ndarray, keys: np.ndarray, load_keys: np.ndarray | None = None):
    """Device blocks -> the tier's ``slots``, then staged back into host rows (verified against ``load_keys``)."""
    engine = TransferEngine(pool, LAYOUT, {TierLevel.DISK: tier}, rank=0)
    n = len(slots)
    engine.start_stores(StepOps.build(0, [(1, Route.D2DISK, 0, np.arange(n), slots, keys)]).select({Route.D2DISK}), None)
    stored = engine.drain(30)
    engine.close()
    loaded, rows = stage(tier, slots, keys if load_keys is None else load_keys)
    return stored, loaded, rows


def test_without_cuda_it_falls_back_loudly_and_still_works(tmp_path: Path) -> None:
    with capture_logs() as logs:
        tier = GdsTier(make_context("gds", 8, tmp_path))
    assert tier.mode == "host-bounce" and not tier.device_direct
    assert any(e["log_level"] == "warning" and "GPUDirect Storage is not available" in e["event"] for e in logs)
    pool = torch.randint(0, 256, (8, BPB), dtype=torch.uint8)
    keys = np.arange(8, dtype=np.uint64).reshape(4, 2)
    stored, loaded, rows = _store_then_load(tier, pool, np.array([6, 0, 1, 2]), keys)
    assert stored[0].ok and loaded.ok and torch.equal(rows[:4], pool[0:4])
    tier.close()


def test_probe_and_diagnose_name_the_mode(tmp_path: Path) -> None:
    mode, detail = probe_mode(None)
    assert mode == "host-bounce" and detail
    ctx = make_context("gds", 4, tmp_path)
    checks = {c.name: c for c in GdsTier.diagnose(ctx.spec, ctx.settings)}
    assert checks["gds mode"].status == "warn" and "host-bounce" in checks["gds mode"].detail
    assert checks["disk directory"].status == "pass"


def test_disk_and_gds_tiers_read_each_others_files(tmp_path: Path) -> None:
    keys = np.arange(100, 108, dtype=np.uint64).reshape(4, 2)
    pool = torch.randint(0, 256, (8, BPB), dtype=torch.uint8)
    disk = LocalDiskTier(make_context("disk", 8, tmp_path))
    _store_then_load(disk, pool, np.array([0, 1, 2, 3]), keys)
    disk.close()

    gds = GdsTier(make_context("gds", 8, tmp_path))  # same namespace and rank: the same file
    assert gds.recovered()[0].tolist() == [0, 1, 2, 3]
    loaded, rows = stage(gds, np.arange(4), keys)
    assert loaded.ok and torch.equal(rows, pool[:4])
    engine = TransferEngine(pool, LAYOUT, {TierLevel.DISK: gds}, rank=0)
    engine.start_stores(StepOps.build(1, [(2, Route.D2DISK, 0, np.arange(4, 8), np.arange(4, 8), keys + np.uint64(50))])
                        .select({Route.D2DISK}), None)
    assert engine.drain(30)[0].ok
    engine.close()
    gds.close()

    disk = LocalDiskTier(make_context("disk", 8, tmp_path))
    assert disk.recovered()[0].tolist() == list(range(8))
    disk.close()


def test_records_stamped_by_the_device_path_verify_on_the_host(tmp_path: Path) -> None:
    """A WSUM64 record (what GDS writes from the GPU) is verified by the disk tier's host read."""
    tier = LocalDiskTier(make_context("disk", 4, tmp_path))
    keys = np.array([[7, 8], [9, 10]], dtype=np.uint64)
    lane = tier.lanes.lane(tier.lanes.acquire(1.0))
    data = tier.data_view(lane, 2)
    data.copy_(torch.randint(0, 256, (2, BPB), dtype=torch.uint8))
    expected = data.clone()
    tier.format.stamp(lane[:2, :HEADER_BYTES].numpy(), 1, keys, wsum64_rows(data), ChecksumKind.WSUM64,
                      np.array([1, 2], dtype=np.uint64))
    tier._io().pwrite_all([memoryview(lane[:2].numpy()).cast("B")], tier.format.offset(1))
    lane.zero_()
    check = tier.read_lane(lane, 1, keys)
    assert check.all_ok and torch.equal(tier.data_view(lane, 2), expected)
    with open(tier.path, "r+b") as f:  # one flipped bit in the second block
        f.seek(2 * tier.record_bytes + HEADER_BYTES + 5)
        b = f.read(1)[0]
        f.seek(2 * tier.record_bytes + HEADER_BYTES + 5)
        f.write(bytes([b ^ 1]))
    assert tier.read_lane(lane, 1, keys).ok.tolist() == [True, False]
    tier.close()
