"""The ``nats`` transport: publish/subscribe for KV events, on a NATS server.

Uses nats-py (asyncio) on a :class:`~kvbm_core.transports.loop.BackgroundLoop`; every call is
bounded by ``timeout_s``. Subscription callbacks run on the transport's loop thread: keep them
short and hand work off. Options (``transport_options.nats``)::

    servers: ["nats://127.0.0.1:4222"]     # the client picks one and fails over to the others
    timeout_s: 5                           # connect and per-call deadline
    kv_events:                             # the leader's KV-event publisher (kvbm_core.cluster)
      enabled: true
      subject: kv-events                   # Dynamo's KV_EVENT_SUBJECT; resync requests: <subject>.resync
      worker_id: null                      # the router's worker id; null: a random one per start
      queue_size: 10000                    # hook calls waiting for the publisher thread; more are dropped
      flush_interval_s: 0.05               # how often queued events are published (Dynamo: 50 ms)
      resync_interval_s: 60                # every held block re-announced this often; 0: only on demand
      max_blocks_per_event: 4096           # larger batches are split (a NATS message is at most 1 MB)

TLS and credentials are not supported yet (a ``tls://`` server is a configuration error).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvbm_core.errors import TransportError
from kvbm_core.interfaces import CheckResult, Transport
from kvbm_core.logging import get_logger
from kvbm_core.settings.model import KvbmSettings
from kvbm_core.transports.loop import BackgroundLoop
from kvbm_core.transports.options import parse_options, reason, split_address

DEFAULT_PORT = 4222
SUBJECT_PATTERN = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"
"""A NATS subject to publish on: dot-separated tokens, no wildcards or spaces."""
log = get_logger("kvbm.transport.nats")

MessageHandler = Callable[[str, bytes], None]
"""Called with ``(subject, payload)`` for each message, on the transport's loop thread."""


class KvEventOptions(BaseModel):
    """``transport_options.nats.kv_events``: the publisher of :mod:`kvbm_core.cluster.kv_events`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    subject: str = Field(default="kv-events", pattern=SUBJECT_PATTERN)
    worker_id: int | None = Field(default=None, ge=0, le=2**64 - 1)
    queue_size: int = Field(default=10_000, ge=1, le=10_000_000)
    flush_interval_s: float = Field(default=0.05, gt=0, le=10, allow_inf_nan=False)
    resync_interval_s: float = Field(default=60.0, ge=0, le=86_400, allow_inf_nan=False)
    max_blocks_per_event: int = Field(default=4096, ge=1, le=10_000)


class NatsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    servers: list[str] = Field(default_factory=lambda: [f"nats://127.0.0.1:{DEFAULT_PORT}"], min_length=1)
    timeout_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    kv_events: KvEventOptions = Field(default_factory=KvEventOptions)

    @field_validator("servers")
    @classmethod
    def _addresses(cls, servers: list[str]) -> list[str]:
        return [_normalise(s) for s in servers]


def _normalise(server: str) -> str:
    host, port = split_address(server, ("nats",), DEFAULT_PORT)
    return f"nats://{host}:{port}"


def nats_options(settings: KvbmSettings) -> NatsOptions:
    return parse_options(NatsOptions, settings.transport_options.get("nats", {}), "transport_options.nats")


@dataclass(frozen=True)
class Subscription:
    """A live subscription; :meth:`unsubscribe` stops delivery."""

    subject: str
    _transport: "NatsTransport"
    _sub: Any

    def unsubscribe(self) -> None:
        self._transport._call("unsubscribe", self._sub.unsubscribe())


class NatsTransport(Transport):
    """A connected NATS client."""

    name = "nats"

    def __init__(self, settings: KvbmSettings) -> None:
        super().__init__(settings)
        self.options = nats_options(settings)
        self._loop = BackgroundLoop("kvbm-nats")
        servers = ", ".join(self.options.servers)
        self._errors: list[str] = []
        try:
            self._nc = self._loop.run(_connect(self.options, self._errors, long_lived=True), self.options.timeout_s)
        except TimeoutError:
            self._loop.stop()
            last = f" (last error: {self._errors[-1]})" if self._errors else ""
            raise TransportError("nats", servers, f"connect timed out{last}") from None
        except TransportError:
            self._loop.stop()
            raise
        except Exception as exc:
            self._loop.stop()
            raise TransportError("nats", servers, f"cannot connect: {reason(exc)}") from exc
        log.debug("nats connected", server=self.server)

    @classmethod
    def validate_options(cls, options: Mapping[str, Any], key: str) -> None:
        parse_options(NatsOptions, options, key)

    @property
    def server(self) -> str:
        url = self._nc.connected_url
        return f"{url.scheme}://{url.hostname}:{url.port}" if url else ", ".join(self.options.servers)

    # ---------------------------------------------------------------------------- messaging
    def publish(self, subject: str, data: bytes) -> None:
        """Queue ``data`` on ``subject`` (delivery is asynchronous; :meth:`flush` waits for it)."""
        self._call("publish", self._nc.publish(subject, data))

    def flush(self) -> None:
        """Wait until the server has received everything published so far."""
        self._call("flush", self._nc.flush(timeout=self.options.timeout_s))

    def subscribe(self, subject: str, handler: MessageHandler) -> Subscription:
        """Deliver messages on ``subject`` (wildcards ``*``/``>`` allowed) to ``handler``."""

        async def deliver(msg: Any) -> None:
            try:
                handler(msg.subject, msg.data)
            except Exception:  # one broken handler must not stop the subscription
                log.exception("nats message handler failed", subject=msg.subject)

        sub = self._call("subscribe", self._subscribe(subject, deliver))
        return Subscription(subject, self, sub)

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._nc.close(), self.options.timeout_s)
        except Exception as exc:  # closing a dead connection must not stop shutdown
            log.warning("nats close failed", server=self.server, error=reason(exc))
        finally:
            self._loop.stop()

    # ------------------------------------------------------------------------------ doctor
    @classmethod
    def diagnose(cls, settings: KvbmSettings) -> list[CheckResult]:
        """One row per server. The engine starts without NATS (its KV events begin once a server
        answers), so a server that does not answer, or loses a message, is a warning."""
        options = nats_options(settings)
        rows = []
        for server in options.servers:
            name = f"nats {server}"
            try:
                version, max_payload = asyncio.run(_probe(options.model_copy(update={"servers": [server]})))
            except Exception as exc:
                rows.append(CheckResult(name, "warn", f"unreachable: {reason(exc)}; the engine serves without KV "
                                                      "events until a server answers"))
                continue
            events = options.kv_events
            use = (f"KV events on {events.subject!r}" if events.enabled
                   else "KV events are off (transport_options.nats.kv_events)")
            rows.append(CheckResult(name, "pass", f"reachable, nats-server {version}; a message made the round "
                                                  f"trip (max payload {max_payload} bytes); {use}"))
        return rows

    # ---------------------------------------------------------------------------- internals
    async def _subscribe(self, subject: str, deliver: Callable[[Any], Any]) -> Any:
        sub = await self._nc.subscribe(subject, cb=deliver)
        await self._nc.flush(timeout=self.options.timeout_s)  # the server knows the interest on return
        return sub

    def _call(self, what: str, coro: Any) -> Any:
        try:
            return self._loop.run(coro, self.options.timeout_s)
        except Exception as exc:
            raise TransportError("nats", self.server, f"{what} failed: {reason(exc)}") from exc


def import_client(options: NatsOptions) -> Any:
    """The nats-py module, imported on first use: only clusters that select the transport need it."""
    try:
        import nats
    except ImportError:
        raise TransportError("nats", ", ".join(options.servers), "the nats-py package is not installed (pip install 'kvbm-core[cluster]')") from None
    return nats


async def _connect(options: NatsOptions, errors: list[str], long_lived: bool) -> Any:
    """Connect, recording each connection error in ``errors``. A long-lived connection keeps
    reconnecting forever; a probe tries each server twice and gives up.

    nats-py retries the first connect as long as it would reconnect, so the caller bounds the wait.
    """
    nats = import_client(options)

    async def on_error(exc: Exception) -> None:
        errors.append(reason(exc))
        if long_lived:
            log.warning("nats connection error", error=reason(exc))

    return await nats.connect(
        servers=list(options.servers),
        connect_timeout=max(1, int(options.timeout_s)),
        allow_reconnect=long_lived,
        max_reconnect_attempts=-1 if long_lived else 1,
        reconnect_time_wait=2 if long_lived else 0,
        error_cb=on_error,
        name="kvbm",
    )


async def _probe(options: NatsOptions) -> tuple[str, int]:
    """The server's version and max payload, once a message published on a private inbox subject
    came back through a subscription (nothing is published on the KV-event subject)."""
    errors: list[str] = []
    try:
        nc = await asyncio.wait_for(_connect(options, errors, long_lived=False), options.timeout_s)
    except Exception as exc:
        raise ConnectionError(errors[-1] if errors else reason(exc)) from exc
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(inbox, b"kvbm doctor")
        try:
            await sub.next_msg(timeout=options.timeout_s)
        except Exception as exc:
            raise ConnectionError(f"a message published on {inbox} did not come back") from exc
        v = nc.connected_server_version
        return f"{v.major}.{v.minor}.{v.patch}", nc.max_payload
    finally:
        await nc.close()
