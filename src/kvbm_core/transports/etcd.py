"""The ``etcd`` transport: a small key-value store for leader/worker discovery, on etcd v3.

Talks gRPC through aetcd (asyncio) on a :class:`~kvbm_core.transports.loop.BackgroundLoop`, with
every call bounded by ``timeout_s``. Options (``transport_options.etcd``)::

    endpoints: ["http://127.0.0.1:2379"]   # tried in order; the first that answers is used
    timeout_s: 5                           # connect and per-call deadline
    prefix: "kvbm/"                        # every key lives under this prefix
    registration:                          # the leader's instance record (kvbm_core.cluster.registration)
      enabled: true
      lease_ttl_s: 10                      # the record disappears this long after the process dies

TLS and authentication are not supported yet (an ``https://`` endpoint is a configuration error).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvbm_core.errors import TransportError
from kvbm_core.interfaces import CheckResult, Transport
from kvbm_core.logging import get_logger
from kvbm_core.settings.model import KvbmSettings
from kvbm_core.transports.loop import BackgroundLoop
from kvbm_core.transports.options import parse_options, reason, split_address

DEFAULT_PORT = 2379
log = get_logger("kvbm.transport.etcd")


class RegistrationOptions(BaseModel):
    """``transport_options.etcd.registration``: the record of :mod:`kvbm_core.cluster.registration`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    lease_ttl_s: int = Field(default=10, ge=2, le=3600)


class EtcdOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: list[str] = Field(default_factory=lambda: [f"http://127.0.0.1:{DEFAULT_PORT}"], min_length=1)
    timeout_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    prefix: str = "kvbm/"
    registration: RegistrationOptions = Field(default_factory=RegistrationOptions)

    @field_validator("endpoints")
    @classmethod
    def _addresses(cls, endpoints: list[str]) -> list[str]:
        for endpoint in endpoints:
            split_address(endpoint, ("http",), DEFAULT_PORT)
        return endpoints


def etcd_options(settings: KvbmSettings) -> EtcdOptions:
    return parse_options(EtcdOptions, settings.transport_options.get("etcd", {}), "transport_options.etcd")


class EtcdTransport(Transport):
    """A connected etcd client. Keys are strings under ``prefix``; values are bytes."""

    name = "etcd"

    def __init__(self, settings: KvbmSettings) -> None:
        super().__init__(settings)
        self.options = etcd_options(settings)
        self._loop = BackgroundLoop("kvbm-etcd")
        endpoints = ", ".join(self.options.endpoints)
        try:
            self._client, self.endpoint = self._loop.run(self._connect(), self.options.timeout_s * (len(self.options.endpoints) + 1))
        except TimeoutError:
            self._loop.stop()
            raise TransportError("etcd", endpoints, "connect timed out") from None
        except BaseException:
            self._loop.stop()
            raise
        log.debug("etcd connected", endpoint=self.endpoint)

    @classmethod
    def validate_options(cls, options: Mapping[str, Any], key: str) -> None:
        parse_options(EtcdOptions, options, key)

    # ---------------------------------------------------------------------------- key-value
    def put(self, key: str, value: bytes) -> None:
        self._call("put", self._client.put(self._key(key), value))

    def get(self, key: str) -> bytes | None:
        result = self._call("get", self._client.get(self._key(key)))
        return None if result is None else bytes(result.value)

    def delete(self, key: str) -> bool:
        """Delete ``key``; True when it existed."""
        result = self._call("delete", self._client.delete(self._key(key)))
        return result is not None and bool(getattr(result, "deleted", 0))

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every key starting with ``prefix`` (without the transport's own prefix) -> value."""
        result = self._call("get_prefix", self._client.get_prefix(self._key(prefix)))
        strip = len(self.options.prefix)
        return {bytes(kv.key).decode()[strip:]: bytes(kv.value) for kv in result}

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._client.close(), self.options.timeout_s)
        except Exception as exc:  # closing a dead connection must not stop shutdown
            log.warning("etcd close failed", endpoint=self.endpoint, error=repr(exc))
        finally:
            self._loop.stop()

    # ------------------------------------------------------------------------------ doctor
    @classmethod
    def diagnose(cls, settings: KvbmSettings) -> list[CheckResult]:
        """One row per endpoint. The engine starts without etcd (it registers once etcd answers),
        so an endpoint that does not answer, or refuses a lease, is a warning."""
        options = etcd_options(settings)
        rows = []
        for endpoint in options.endpoints:
            name = f"etcd {endpoint}"
            try:
                version = asyncio.run(_probe(endpoint, options.timeout_s))
            except Exception as exc:
                rows.append(CheckResult(name, "warn", f"unreachable: {reason(exc)}; the engine serves without its "
                                                      "registration until etcd answers"))
                continue
            use = ("a lease was granted and revoked (instance registration works)"
                   if options.registration.enabled else "registration is off (transport_options.etcd.registration)")
            rows.append(CheckResult(name, "pass", f"reachable, etcd {version}; {use}"))
        return rows

    # ---------------------------------------------------------------------------- internals
    def _key(self, key: str) -> bytes:
        return (self.options.prefix + key).encode()

    def _call(self, what: str, coro: Any) -> Any:
        try:
            return self._loop.run(coro, self.options.timeout_s)
        except Exception as exc:
            raise TransportError("etcd", self.endpoint, f"{what} failed: {reason(exc)}") from exc

    async def _connect(self) -> tuple[Any, str]:
        return await open_client(self.options)


async def open_client(options: EtcdOptions) -> tuple[Any, str]:
    """A connected client on the first endpoint that answers, and that endpoint."""
    failures = []
    for endpoint in options.endpoints:
        try:
            client, _ = await _open(endpoint, options.timeout_s)
            return client, endpoint
        except Exception as exc:
            failures.append(f"{endpoint}: {reason(exc)}")
    raise TransportError("etcd", ", ".join(options.endpoints), "no endpoint answered (" + "; ".join(failures) + ")")


async def _open(endpoint: str, timeout_s: float) -> tuple[Any, str]:
    """A connected client and the server's version; the status call proves the server answers."""
    try:
        import aetcd  # imported here: only clusters that select the transport need the client
    except ImportError:
        raise TransportError("etcd", endpoint, "the aetcd package is not installed (pip install 'kvbm-core[cluster]')") from None
    host, port = split_address(endpoint, ("http",), DEFAULT_PORT)
    client = aetcd.Client(host=host, port=port, timeout=timeout_s, connect_wait_timeout=max(1, int(timeout_s)))
    try:
        await asyncio.wait_for(client.connect(), timeout_s)
        status = await asyncio.wait_for(client.status(), timeout_s)
    except BaseException:
        await client.close()
        raise
    return client, str(getattr(status, "version", "?"))


async def _probe(endpoint: str, timeout_s: float) -> str:
    """The server's version, once it granted a lease of 2 s and revoked it (what registration needs)."""
    client, version = await _open(endpoint, timeout_s)
    try:
        lease = await asyncio.wait_for(client.lease(2), timeout_s)
        await asyncio.wait_for(lease.revoke(), timeout_s)
    finally:
        await client.close()
    return version
