"""Host memory and the host tier: alignment, shape, segments, allocation figures, the no-CUDA log."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvbm_core.errors import ConfigError
from kvbm_core.storage import HostMemory, StagingLanes
from kvbm_core.storage.host_memory import PAGE
from kvbm_tier_cpu import PinnedHostTier

from tierkit import LAYOUT, make_context


def test_memory_is_page_aligned_writable_and_measured() -> None:
    mem = HostMemory(5 * PAGE + 123, device=None, segment_target_bytes=2 * PAGE, threads=3)
    assert mem.address % PAGE == 0
    assert mem.tensor.numel() == 5 * PAGE + 123
    assert mem.segment_bytes == 2 * PAGE
    assert mem.stats.segments == 3 and mem.stats.nbytes == 5 * PAGE + 123
    assert not mem.pinned and not mem.stats.pinned
    assert mem.stats.total_s >= 0 and mem.stats.gbps > 0
    mem.tensor.fill_(7)
    assert int(mem.tensor.sum()) == 7 * mem.tensor.numel()
    mem.close()


def test_segments_hold_whole_units() -> None:
    mem = HostMemory(10 * 3000, device=None, unit_bytes=3000, segment_target_bytes=10_000)
    assert mem.segment_bytes == 9000
    mem.close()


def test_pageable_memory_is_logged_once_per_process() -> None:
    code = (
        "from kvbm_core.logging import configure; configure();"
        "from kvbm_core.storage import HostMemory;"
        "a = HostMemory(4096, device=None); b = HostMemory(8192, device=None)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr.count("host memory stays pageable") == 1, proc.stderr


def test_host_tier_pool_is_block_major_uint8() -> None:
    tier = PinnedHostTier(make_context("cpu", 12))
    slots = tier.slots
    assert slots.shape == (12, LAYOUT.bytes_per_block) and slots.dtype == torch.uint8
    assert slots.is_contiguous() and slots.data_ptr() % PAGE == 0
    assert tier.segment_slots >= 1 and tier.allocation is not None and tier.allocation.nbytes == slots.numel()
    slots[3] = 9
    assert int(slots[3].sum()) == 9 * LAYOUT.bytes_per_block and int(slots[4].sum()) == 0
    tier.close()
    tier.close()  # closing twice is harmless


@pytest.mark.parametrize("options", [{"alloc_threads": 0}, {"segment_mb": "big"}, {"colour": 1}])
def test_host_tier_rejects_bad_options(options: dict) -> None:
    with pytest.raises(ConfigError, match="tiers.cpu.options"):
        PinnedHostTier(make_context("cpu", 4, options=options))


def test_staging_lanes_hand_out_each_lane_once() -> None:
    lanes = StagingLanes(2, records=3, record_bytes=8192, device=None)
    a, b = lanes.acquire(1.0), lanes.acquire(1.0)
    assert {a, b} == {0, 1} and lanes.lane(a).shape == (3, 8192)
    assert lanes.lane(a).data_ptr() % PAGE == 0
    with pytest.raises(TimeoutError):
        lanes.acquire(0.05)
    lanes.release(a)
    assert lanes.acquire(1.0) == a
    lanes.close()
