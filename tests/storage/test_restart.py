"""Restart safety: a new process serves what an earlier one wrote, and never a torn block."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvbm_core.interfaces import TierLevel
from kvbm_core.ops import Route, StepOps
from kvbm_core.worker import TransferEngine
from kvbm_tier_disk import LocalDiskTier
from kvbm_tier_disk.format import HEADER_BYTES, ChecksumKind, xxh3_rows

from tierkit import LAYOUT, make_context, stage
from restart_writer import content

HERE = Path(__file__).parent
BPB = LAYOUT.bytes_per_block


def _writer(directory: Path, slots: int, count: int, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(HERE / "restart_writer.py"), str(directory), str(slots), str(count)],
                            env=env, text=True, **kw)


def test_second_process_reads_blocks_the_first_wrote(tmp_path: Path) -> None:
    assert _writer(tmp_path, 16, 10).wait(timeout=120) == 0
    tier = LocalDiskTier(make_context("disk", 16, tmp_path))
    slots, keys = tier.recovered()
    assert slots.tolist() == list(range(10))
    result, pool = stage(tier, slots, keys)
    assert result.ok and result.num_bytes == 10 * BPB
    assert torch.equal(pool, content(keys, BPB))
    tier.close()


def test_torn_write_is_never_served(tmp_path: Path) -> None:
    assert _writer(tmp_path, 8, 4).wait(timeout=120) == 0
    tier = LocalDiskTier(make_context("disk", 8, tmp_path))
    old_keys = tier.recovered()[1]
    # Crash mid-write of a new block into slot 2: its header and the first half of its bytes reached
    # the file, the rest of the slot still holds the old block. Built with the real format code.
    new_key = np.array([[555, 556]], dtype=np.uint64)
    record = np.zeros((1, tier.record_bytes), dtype=np.uint8)
    data = torch.from_numpy(record)[:, HEADER_BYTES:HEADER_BYTES + BPB]
    data.copy_(content(new_key, BPB))
    tier.format.stamp(record[:, :HEADER_BYTES], 2, new_key, xxh3_rows(data), ChecksumKind.XXH3_64,
                      np.array([99], dtype=np.uint64))
    tier.close()
    with open(tier.path, "r+b") as f:
        f.seek(2 * tier.record_bytes)
        f.write(record[0, : HEADER_BYTES + BPB // 2].tobytes())

    again = LocalDiskTier(make_context("disk", 8, tmp_path))
    for key in (new_key, old_keys[2:3]):
        result, _ = stage(again, np.array([2]), key)
        assert not result.ok and result.failed_blocks == (0,) and result.num_bytes == 0
    result, pool = stage(again, np.array([0, 1, 3]), old_keys[[0, 1, 3]])
    assert result.ok and torch.equal(pool, content(old_keys[[0, 1, 3]], BPB))
    again.close()


def test_writer_killed_mid_write_leaves_nothing_wrong(tmp_path: Path) -> None:
    writer = _writer(tmp_path, 32, 0, stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None
        for _ in range(200):  # let it write a while, then kill it without warning
            writer.stdout.readline()
        time.sleep(0.01)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    tier = LocalDiskTier(make_context("disk", 32, tmp_path))
    slots, keys = tier.recovered()
    assert len(slots) > 0
    result, pool = stage(tier, slots, keys)
    good = np.setdiff1d(np.arange(len(slots)), result.failed_blocks)
    assert len(good) > 0
    assert torch.equal(pool[good], content(keys[good], BPB))  # whatever is served is exactly right
    tier.close()
