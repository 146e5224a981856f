"""A disk whose filesystem fails is routed around: requests recompute, nothing fails, and the tier
is tried again later (``kvbm_core.leader.breaker``). The failing filesystem is a real ext4, shut
down with ``EXT4_IOC_SHUTDOWN`` under the running engine, so every read and write gets ``EIO``."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest

from engine_runs import CONNECTOR, close_connector, conversations, executor_config, settle, write_profile

from kvbm_core import hookimpl
from kvbm_core.leader.breaker import TierBreaker, TierService
from kvbm_core.testing import ReferenceExecutor

EXT4_IOC_SHUTDOWN = 0x8004587D
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def shut_down(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    except OSError as exc:
        pytest.skip(f"this kernel cannot shut an ext4 filesystem down: {exc}")
    finally:
        os.close(fd)


def test_a_disk_that_fails_under_the_engine_is_taken_out_of_service(mount, tmp_path, monkeypatch):
    disk_dir = mount("ext4", image_mb=64, mkfs=["mkfs.ext4", "-q", "-F"])
    profile = write_profile(tmp_path / "profile.yaml", [{"kind": "cpu", "num_blocks": 24},
                                                         {"kind": "disk", "num_blocks": 256}],
                            disk_offload_filter={"enabled": False})
    monkeypatch.setenv("DYN_KVBM_PROFILE", str(profile))
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(disk_dir))
    specs = conversations(users=4, turns=4)
    turns = [[s for i, s in enumerate(specs) if i % 4 == t] for t in range(4)]  # user-major order
    baseline = ReferenceExecutor(executor_config())
    expected = [baseline.run(turn).tokens() for turn in turns]
    engine = ReferenceExecutor(executor_config(), connector=CONNECTOR, model=baseline.model)
    changes: list[tuple[str, bool]] = []
    engine.scheduler._registry.register(_ServiceLog(changes), "service-log")
    try:
        assert engine.run(turns[0]).tokens() == expected[0]
        settle(engine)
        manager = engine.scheduler._block_manager()
        assert engine.scheduler.stats.offload_blocks_h2disk > 0
        shut_down(disk_dir)
        for turn, want in zip(turns[1:3], expected[1:3]):
            result = engine.run(turn)
            settle(engine)
            assert result.tokens() == want and not any(r.error for r in result.requests)
        assert manager.disk_breaker.state is TierService.OUT_OF_SERVICE
        assert changes == [("disk", False)]
        failed = engine.scheduler.stats.failed_ops
        result = engine.run(turns[3])  # out of service: nothing is planned to or from the disk
        settle(engine)
        assert result.tokens() == expected[3] and not any(r.error for r in result.requests)
        assert engine.scheduler.stats.failed_ops == failed
        manager.verify()
    finally:
        close_connector(engine)


class _ServiceLog:
    def __init__(self, changes: list[tuple[str, bool]]) -> None:
        self.changes = changes

    @hookimpl
    def kvbm_tier_service_changed(self, tier: str, in_service: bool, error: str) -> None:
        self.changes.append((tier, in_service))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_on_device_failures_only_and_retries_with_growing_backoff():
    clock, changes = _Clock(), []
    breaker = TierBreaker("disk", clock, lambda tier, up, error: changes.append(up), threshold=3,
                          first_backoff_s=10, max_backoff_s=25)
    for _ in range(5):
        breaker.record(ok=False, device_failed=False, error="checksum")  # bad blocks: the device is fine
    assert breaker.allows()
    breaker.record(False, True)
    breaker.record(False, True)
    breaker.record(True, False)  # a success in between: the count starts again
    breaker.record(False, True)
    breaker.record(False, True)
    assert breaker.allows()
    breaker.record(False, True, "EIO")
    assert not breaker.allows() and changes == [False]
    clock.now = 9.9
    assert not breaker.allows()
    clock.now = 10.0
    assert breaker.allows() and breaker.state is TierService.ON_TRIAL
    breaker.record(False, True, "EIO")  # the trial failed: out again, for twice as long
    clock.now = 29.9
    assert not breaker.allows()
    clock.now = 30.0
    assert breaker.allows()
    breaker.record(False, True)
    clock.now = 30.0 + 24.9  # capped at max_backoff_s
    assert not breaker.allows()
    clock.now = 55.0
    assert breaker.allows()
    breaker.record(True, False)
    assert breaker.state is TierService.IN_SERVICE and changes == [False, False, False, True]
