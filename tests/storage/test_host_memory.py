"""Host memory and the host tier: alignment, shape, segments, allocation figures, the no-CUDA log,
and a pool that grows in the background: its usable prefix, pausing, failure, closing mid-growth."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from kvbm_core.errors import ConfigError
from kvbm_core.storage import HostMemory, StagingLanes
from kvbm_core.storage.contracts import check_tier_instance
from kvbm_core.storage.host_memory import PAGE
from kvbm_tier_cpu import PinnedHostTier

from tierkit import LAYOUT, make_context

SEG = 16 * PAGE
MIB = 1 << 20
BPB = LAYOUT.bytes_per_block


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


@pytest.mark.parametrize("options", [
    {"alloc_threads": 0}, {"segment_mb": "big"}, {"colour": 1}, {"start_mb": 0}, {"start_mb": True},
    {"segment_mb": float("nan")}, {"start_mb": float("inf")}, {"grow_threads": 1.5}, {"grow_threads": -1},
])
def test_host_tier_rejects_bad_options(options: dict) -> None:
    with pytest.raises(ConfigError, match="tiers.cpu.options"):
        PinnedHostTier(make_context("cpu", 4, options=options))


def growing_tier(num_slots: int, segment_slots: int, start_slots: int, **kwargs) -> PinnedHostTier:
    """A cpu tier of ``segment_slots``-slot segments, ``start_slots`` usable at start, paused."""
    options = {"segment_mb": segment_slots * BPB / MIB, "start_mb": start_slots * BPB / MIB, "grow_threads": 2}
    return PinnedHostTier(make_context("cpu", num_slots, options=options), paused=True, **kwargs)


def test_usable_prefix_only_grows_in_whole_segments_until_all_is_usable() -> None:
    mem = HostMemory(64 * SEG, device=None, segment_target_bytes=SEG, start_bytes=1, grow_threads=3)
    assert mem.stats.nbytes == SEG and mem.stats.segments == 1  # one segment before the constructor returned
    seen = [mem.ready_bytes]
    deadline = time.monotonic() + 60
    while mem.growing and time.monotonic() < deadline:
        seen.append(mem.ready_bytes)
        time.sleep(0)
    seen.append(mem.ready_bytes)
    assert seen[0] >= SEG
    assert all(a <= b for a, b in zip(seen, seen[1:])), "the usable prefix shrank"
    assert all(x % SEG == 0 for x in seen), "the usable prefix ended inside a segment"
    assert mem.wait_ready(mem.nbytes, timeout=60) == mem.nbytes
    assert mem.growth_error is None and mem.full_s is not None and not mem.growing
    mem.close()


def test_paused_memory_keeps_its_start_until_resumed() -> None:
    mem = HostMemory(8 * SEG, device=None, segment_target_bytes=SEG, start_bytes=2 * SEG + 1, paused=True)
    assert mem.ready_bytes == 3 * SEG and mem.growing  # rounded up to whole segments
    assert mem.wait_ready(mem.nbytes, timeout=0.05) == 3 * SEG  # bounded: answers what is ready
    mem.resume_growth()
    assert mem.wait_ready(mem.nbytes, timeout=60) == mem.nbytes
    mem.close()
    assert mem.ready_bytes == mem.nbytes and not mem.growing


def test_bytes_in_usable_slots_survive_growth() -> None:
    tier = growing_tier(64, segment_slots=4, start_slots=5)
    assert tier.segment_slots == 4 and tier.ready_slots == 8 and tier.allocation.nbytes == 8 * BPB
    assert check_tier_instance(tier) is None
    rows = torch.randint(0, 256, (64, BPB), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    tier.slots[:8] = rows[:8]
    tier.resume_growth()
    written = 8
    deadline = time.monotonic() + 60
    while written < 64 and time.monotonic() < deadline:  # fill each slot as soon as it is usable
        ready = tier.wait_ready(written + 1, timeout=1.0)
        tier.slots[written:ready] = rows[written:ready]
        assert torch.equal(tier.slots[:written], rows[:written]), "growth changed bytes already in use"
        written = ready
    assert tier.wait_ready(64, timeout=60) == 64 and tier.growth_error is None
    assert torch.equal(tier.slots, rows)
    tier.close()
    assert tier.ready_slots == 0


def test_host_tier_without_start_option_starts_with_one_segment() -> None:
    tier = PinnedHostTier(make_context("cpu", 40, options={"segment_mb": 3 * BPB / MIB}), paused=True)
    assert tier.segment_slots == 3 and tier.ready_slots == 3
    tier.close()


class Overgrown(PinnedHostTier):
    @property
    def ready_slots(self) -> int:
        return self.context.num_slots + 1


def test_a_host_tier_claiming_more_ready_slots_than_it_has_breaks_its_contract() -> None:
    tier = Overgrown(make_context("cpu", 4))
    assert check_tier_instance(tier) == "ready_slots must be an int in [0, num_slots=4], got 5"
    tier.close()


CLOSE_DURING_GROWTH = """
import random, threading, time
from kvbm_core.storage import HostMemory
rng = random.Random(0)
for i in range(150):
    mem = HostMemory(64 * {seg}, device=None, segment_target_bytes={seg}, start_bytes=1, grow_threads=4,
                     paused=rng.random() < 0.2)
    if rng.random() < 0.6:
        mem.resume_growth()
    time.sleep(rng.random() * 0.003)
    address, ready = mem.address, mem.ready_bytes
    mem.tensor[:ready].fill_(1)
    mem.close()
    assert not mem.growing and mem.tensor.numel() == 0
    with open("/proc/self/maps") as maps:
        assert f"{{address:x}}-" not in maps.read(), "still mapped after close"
    alive = [t.name for t in threading.enumerate() if t.name.startswith("kvbm-host-grow")]
    assert not alive, alive
print("closed cleanly")
"""


def test_close_during_growth_stops_the_threads_and_unmaps_every_time() -> None:
    proc = subprocess.run([sys.executable, "-c", CLOSE_DURING_GROWTH.format(seg=SEG)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "closed cleanly" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


FAILED_GROWTH = """
import ctypes
from kvbm_core.logging import configure
from kvbm_core.storage import HostMemory
configure()
libc = ctypes.CDLL(None, use_errno=True)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
mem = HostMemory(16 * {seg}, device=None, segment_target_bytes={seg}, start_bytes=1, paused=True,
                 label="cpu tier rank 3")
assert libc.munmap(mem.address + 5 * {seg}, {seg}) == 0  # the kernel takes segment 5 away
mem.resume_growth()
ready = mem.wait_ready(mem.nbytes, timeout=60)
assert ready == 5 * {seg} and not mem.growing, ready
assert "cannot fault in" in mem.growth_error, mem.growth_error
mem.tensor[:ready].fill_(3)
assert int(mem.tensor[:ready].sum()) == 3 * ready
mem.close()
print("prefix kept")
"""


def test_failed_growth_is_logged_with_its_label_and_keeps_the_usable_prefix() -> None:
    proc = subprocess.run([sys.executable, "-c", FAILED_GROWTH.format(seg=SEG)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "prefix kept" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    (line,) = [line for line in proc.stderr.splitlines() if "stopped growing" in line]
    assert "cpu tier rank 3" in line and "segment=5" in line


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
