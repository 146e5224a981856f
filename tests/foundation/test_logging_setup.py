"""structlog logging: console by default, JSON lines with DYN_KVBM_LOG_FORMAT=json, bound context,
stderr only, and no duplicate handlers when configured twice."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest

from kvbm_core.logging import bound, configure, get_logger
from kvbm_core.settings.model import LoggingSettings

SCRIPT = """
from kvbm_core.logging import bound, configure, get_logger
from kvbm_core.settings import resolve_settings
import logging
configure(resolve_settings().settings.logging)
configure(resolve_settings().settings.logging)  # twice: still one line per record
log = get_logger("kvbm.worker", rank=3)
with bound(request_id=42, tier="disk"):
    log.info("onboard done", blocks=12)
log.debug("hidden at info level")
logging.getLogger("nats.aio.client").warning("from the standard library")
print("stdout stays clean")
"""


@pytest.fixture
def run_script(kvbm_env):
    def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", SCRIPT], env=kvbm_env(env), capture_output=True, text=True, timeout=60)

    return run


def test_json_lines_with_bound_context_on_stderr(run_script):
    proc = run_script({"DYN_KVBM_LOG_FORMAT": "json"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "stdout stays clean\n"
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert len(records) == 2, proc.stderr
    first, second = records
    assert first["event"] == "onboard done"
    assert (first["rank"], first["request_id"], first["tier"], first["blocks"]) == (3, 42, "disk", 12)
    assert first["level"] == "info" and first["logger"] == "kvbm.worker" and "timestamp" in first
    assert second["event"] == "from the standard library" and second["logger"] == "nats.aio.client"


def test_console_by_default_and_level_from_environment(run_script):
    proc = run_script({})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr
    assert "onboard done" in lines[0] and "request_id=42" in lines[0] and "rank=3" in lines[0]
    assert not lines[0].startswith("{")

    debug = run_script({"DYN_KVBM_LOG_LEVEL": "DEBUG"})
    assert "hidden at info level" in debug.stderr
    quiet = run_script({"DYN_KVBM_LOG_LEVEL": "error"})
    assert quiet.stderr == ""


def test_bound_context_ends_with_the_block_and_exceptions_render_in_json(log_capture):
    buffer = io.StringIO()
    configure(LoggingSettings(format="json", level="info"), stream=buffer)
    log = get_logger("kvbm.test")
    with bound(request_id=1):
        log.info("inside")
    log.info("outside")
    try:
        raise ValueError("bad block")
    except ValueError:
        log.exception("load failed")
    inside, outside, failed = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert inside["request_id"] == 1 and "request_id" not in outside
    assert failed["level"] == "error" and failed["exception"][0]["exc_type"] == "ValueError"
    assert len([h for h in logging.getLogger().handlers if h.get_name() == "kvbm"]) == 1
