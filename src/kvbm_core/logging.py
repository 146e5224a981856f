"""Logging for kvbm: structlog to stderr, readable console lines or JSON lines.

:func:`configure` is called once per process by the CLI and by the connector, from
``settings.logging`` (``DYN_KVBM_LOG_FORMAT=json``, ``DYN_KVBM_LOG_LEVEL``). Context travels as
bound key-value pairs, never formatted into the message::

    log = get_logger("kvbm.worker", rank=0)
    with bound(request_id=7, tier="disk"):
        log.info("onboard done", blocks=12)

Records of the standard ``logging`` module (aetcd, nats, grpc) go through the same renderer, but
``DYN_KVBM_LOG_LEVEL`` sets the level of kvbm's own loggers only: other libraries keep theirs
(warnings and above by default), so ``debug`` shows kvbm's decisions, not matplotlib's font search.
In the JSON format every line is a JSON object: Python warnings are routed through logging too.
Calling :func:`configure` again replaces the previous configuration; it never adds handlers twice.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

from kvbm_core.settings.model import LoggingSettings

_HANDLER_NAME = "kvbm"
KVBM_LOGGER = "kvbm"

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def configure(settings: LoggingSettings | None = None, stream: TextIO | None = None, scope: str | None = None) -> None:
    """Route logs to ``stream`` (stderr) in the chosen format.

    ``scope=None`` (the CLI) takes over the root logger, so the standard library's records look
    alike. Inside an engine (``scope="kvbm"``, the connector) only kvbm's own loggers are routed, and
    they do not propagate: the engine's logging stays as the engine set it up.
    """
    settings = settings or LoggingSettings()
    level = getattr(logging, settings.level.upper())
    if settings.format == "json":
        renderer: Any = structlog.processors.JSONRenderer()
        tracebacks = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        final = [structlog.processors.ExceptionRenderer(tracebacks), renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(stream or sys.stderr))
        final = [renderer]

    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        )
    )
    kvbm = logging.getLogger(KVBM_LOGGER)
    if scope is None:  # a process-wide configuration replaces any scoped one made earlier
        for old in [h for h in kvbm.handlers if h.get_name() == _HANDLER_NAME]:
            kvbm.removeHandler(old)
        kvbm.propagate = True
    target = logging.getLogger(scope)
    for old in [h for h in target.handlers if h.get_name() == _HANDLER_NAME]:
        target.removeHandler(old)
    target.addHandler(handler)
    kvbm.setLevel(level)
    if scope is None:
        # Other libraries log through the root logger at their own level: warnings and above, or
        # higher when kvbm's level is higher (DYN_KVBM_LOG_LEVEL=error quiets everything).
        target.setLevel(max(level, logging.WARNING))
        logging.captureWarnings(settings.format == "json")
    else:
        target.propagate = False


def get_logger(name: str, **context: Any) -> Any:
    """A logger named ``name`` with ``context`` (rank, tier, ...) bound to every record."""
    return structlog.get_logger(name).bind(**context) if context else structlog.get_logger(name)


@contextmanager
def bound(**context: Any) -> Iterator[None]:
    """Bind ``context`` (for example ``request_id``) to every record logged inside the block."""
    with structlog.contextvars.bound_contextvars(**context):
        yield


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
