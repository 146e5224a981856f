"""DYN_KVBM_LOG_LEVEL sets kvbm's level only; the JSON format prints only JSON; the leader's summary
line is a subscriber of the event hooks on a timer; the CLI ends quietly when its reader goes away."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from kvbm_core import summary
from kvbm_core.interfaces import TierLevel
from kvbm_core.ops import TierAllocation
from kvbm_core.registry import Registry
from kvbm_core.settings import KvbmSettings

SCRIPT = """
import logging, warnings
from kvbm_core.logging import configure, get_logger
from kvbm_core.settings import resolve_settings
configure(resolve_settings().settings.logging)
logging.getLogger("matplotlib.font_manager").debug("findfont: scoring fonts")
logging.getLogger("matplotlib.font_manager").info("third-party info")
logging.getLogger("nats.aio.client").warning("third-party warning")
get_logger("kvbm.leader").debug("kvbm decision", request_id=3)
warnings.warn("a deprecation somewhere")
"""


def run_script(kvbm_env, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT], env=kvbm_env(env), capture_output=True, text=True, timeout=60)


def test_debug_shows_kvbm_and_leaves_other_libraries_at_their_level(kvbm_env):
    proc = run_script(kvbm_env, {"DYN_KVBM_LOG_LEVEL": "debug"})
    assert proc.returncode == 0, proc.stderr
    assert "kvbm decision" in proc.stderr
    assert "third-party warning" in proc.stderr
    assert "findfont" not in proc.stderr and "third-party info" not in proc.stderr


def test_json_format_prints_only_json_lines(kvbm_env, run_kvbm):
    proc = run_script(kvbm_env, {"DYN_KVBM_LOG_LEVEL": "debug", "DYN_KVBM_LOG_FORMAT": "json"})
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert {r["event"] for r in records} >= {"kvbm decision", "third-party warning"}
    assert any("a deprecation somewhere" in r["event"] for r in records), "Python warnings are JSON too"

    error = run_kvbm("config", "show", env={"DYN_KVBM_LOG_FORMAT": "json", "DYN_KVBM_CPU_CACHE_GIGS": "4"})
    assert error.returncode == 2
    (record,) = [json.loads(line) for line in error.stderr.splitlines()]
    assert record["level"] == "error" and "DYN_KVBM_CPU_CACHE_GIGS" in record["event"]


@pytest.mark.parametrize("command", [("plugins",), ("config", "show"), ("config", "show", "--json"), ("config", "path"), ("doctor",)])
def test_a_reader_that_stops_early_ends_the_command_quietly(kvbm_env, command):
    """What ``kvbm ... | head -1`` does, made certain: the reader is gone before kvbm writes."""
    kvbm = Path(sys.executable).with_name("kvbm")
    env = kvbm_env({"DYN_KVBM_CPU_CACHE_GB": "0.01"})
    proc = subprocess.Popen([str(kvbm), *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(120) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


@dataclass(frozen=True)
class Pipeline:
    settings: KvbmSettings
    tiers: tuple[TierAllocation, ...]


@pytest.fixture
def summarised():
    settings = KvbmSettings(cache_stats={"max_requests": 10, "log_interval_secs": 3600})
    pipeline = Pipeline(settings, (TierAllocation("cpu", TierLevel.HOST, 100), TierAllocation("disk", TierLevel.DISK, 1000)))
    registry = Registry()
    registry.notify("kvbm_pipeline_built", pipeline=pipeline)
    yield registry, pipeline
    registry.notify("kvbm_pipeline_closed", pipeline=pipeline)


def summary_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "kvbm summary" in line]


def test_summary_line_reports_hit_rates_bandwidth_and_fill(summarised, log_capture):
    registry, pipeline = summarised
    active = summary.active_summary()
    assert active is not None and active.pipeline is pipeline
    notify = registry.notify
    notify("kvbm_request_matched", request_id=1, requested_tokens=64, device_tokens=0, host_tokens=32, disk_tokens=16)
    notify("kvbm_request_finished", request_id=1, queried_blocks=4, host_hit_blocks=2, disk_hit_blocks=1)
    notify("kvbm_blocks_offloaded", route="d2h", num_blocks=8, num_bytes=8_000_000_000, seconds=2.0)
    notify("kvbm_blocks_onboarded", tier="disk", request_id=1, num_blocks=1, num_bytes=1_000_000_000, seconds=1.0)
    notify("kvbm_transfer_failed", route="disk2h", op_id=1, request_id=1, error="checksum")
    notify("kvbm_blocks_stored", tier="cpu", route="d2h", keys=np.zeros((8, 2), np.uint64), seq_hashes=np.zeros(8, np.uint64))
    notify("kvbm_blocks_removed", tier="cpu", keys=np.zeros((2, 2), np.uint64), seq_hashes=np.zeros(2, np.uint64))
    active.log_once()
    (line,) = summary_lines(log_capture.getvalue())
    for field in ("host_hit_rate=0.5", "disk_hit_rate=0.25", "d2h_blocks=8", "d2h_gbps=4.0", "disk2h_gbps=1.0",
                  "disk2h_failures=1", "cpu_fill=6/100", "disk_fill=0/1000"):
        assert field in line, (field, line)
    assert "prefix lookup" in log_capture.getvalue() and "host=32" in log_capture.getvalue(), "debug: each lookup"
    active.log_once()
    assert len(summary_lines(log_capture.getvalue())) == 1, "nothing happened: no new line"


def test_summary_runs_on_its_timer_and_flushes_at_close(log_capture):
    settings = KvbmSettings(cache_stats={"log_interval_secs": 0.05})
    pipeline = Pipeline(settings, (TierAllocation("cpu", TierLevel.HOST, 10),))
    registry = Registry()
    registry.notify("kvbm_pipeline_built", pipeline=pipeline)
    try:
        registry.notify("kvbm_blocks_offloaded", route="d2h", num_blocks=1, num_bytes=10, seconds=0.001)
        deadline = time.monotonic() + 30
        while not summary_lines(log_capture.getvalue()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert summary_lines(log_capture.getvalue()), "the timer logged the line"
        registry.notify("kvbm_blocks_offloaded", route="d2h", num_blocks=2, num_bytes=20, seconds=0.001)
    finally:
        registry.notify("kvbm_pipeline_closed", pipeline=pipeline)
    assert summary.active_summary() is None
    assert any("d2h_blocks=" in line for line in summary_lines(log_capture.getvalue()))
    blocks = sum(int(line.split("d2h_blocks=")[1].split()[0]) for line in summary_lines(log_capture.getvalue()))
    assert blocks == 3, "every event is in exactly one line"


def test_interval_zero_turns_the_summary_off():
    pipeline = Pipeline(KvbmSettings(cache_stats={"log_interval_secs": 0}), ())
    registry = Registry()
    registry.notify("kvbm_pipeline_built", pipeline=pipeline)
    assert summary.active_summary() is None
    registry.notify("kvbm_pipeline_closed", pipeline=pipeline)
