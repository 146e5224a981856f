"""Validation of ``transport_options.<name>`` and of server addresses, and the one-line reason of a
connection failure, shared by the transports.

A bad option is a :class:`~kvbm_core.errors.ConfigError` naming ``transport_options.<name>.<key>``
and the accepted values, raised by ``resolve_settings`` (through ``validate_options``) before any
connection is tried.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError

from kvbm_core.errors import ConfigError
from kvbm_core.settings.accepted import accepted_at

M = TypeVar("M", bound=BaseModel)


def parse_options(model: type[M], options: Mapping[str, Any], key: str) -> M:
    """Validate ``options`` against ``model``; errors name ``key.<field>``."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join([key, *(str(p) for p in err["loc"])])
        accepted = None if err["type"] == "value_error" else accepted_at(model, err["loc"], err["type"])
        raise ConfigError(where, f"{err['msg']} (got {err.get('input')!r})", accepted) from None


def split_address(address: str, schemes: tuple[str, ...], default_port: int) -> tuple[str, int]:
    """``scheme://host:port`` or ``host:port`` -> ``(host, port)``; a :class:`ValueError` otherwise."""
    parts = urlsplit(address if "://" in address else f"{schemes[0]}://{address}")
    if parts.scheme not in schemes:
        raise ValueError(f"{address!r}: scheme must be {' or '.join(s + '://' for s in schemes)}")
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"{address!r}: the port is not a number from 1 to 65535") from None
    if not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"{address!r}: expected {schemes[0]}://HOST:PORT")
    return parts.hostname, port


def reason(exc: BaseException) -> str:
    """A short human reason: ``timed out``, ``Connection refused (…)``, or the error's first line."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"{os.strerror(exc.errno)} ({exc.strerror})" if exc.strerror else os.strerror(exc.errno)
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
