"""Once-per-process setup and at-exit cleanup shared by the leader and the worker."""

from __future__ import annotations

import atexit
import threading
import weakref
from typing import Any

import structlog

from kvbm_core.logging import configure as configure_logging
from kvbm_core.settings import KvbmSettings

log = structlog.get_logger("kvbm.connector")
_logging_configured = threading.Event()


def configure_logging_once(settings: KvbmSettings) -> None:
    """Once per engine process: kvbm's loggers in the format DYN_KVBM_LOG_FORMAT asks for."""
    if not _logging_configured.is_set():
        _logging_configured.set()
        configure_logging(settings.logging, scope="kvbm")


def close_at_exit(obj: Any) -> None:
    """Call ``obj.close()`` at interpreter exit if it is still alive then (a weak reference)."""
    atexit.register(_close_weakly, weakref.ref(obj))


def _close_weakly(ref: "weakref.ref[Any]") -> None:
    obj = ref()
    if obj is not None:
        try:
            obj.close()
        except Exception:  # at interpreter exit, never turn a clean shutdown into a crash
            log.exception("kvbm close at exit failed")
