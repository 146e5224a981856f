"""This instance's record in etcd, under a lease kept alive from a thread of its own.

The record (:func:`kvbm_core.cluster.instance.instance_record`, JSON) is put at
``<prefix>instances/<worker id, 16 hex digits>`` attached to a lease of ``lease_ttl_s`` seconds,
refreshed every third of that. So the key exists exactly while the instance lives:

- the instance stops (``kvbm_pipeline_closed``): the lease is revoked and the key goes at once;
- the process dies (SIGKILL, a crash, a lost host): nobody refreshes the lease and etcd deletes
  the key when it expires, at most ``lease_ttl_s`` later;
- etcd is unreachable or restarts: the refresh fails, the thread retries every second (bounded by
  ``timeout_s`` per call) and, once etcd answers, puts the record again under a new lease. One
  warning when etcd is lost (or never reached), one line when the record is back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from kvbm_core.logging import get_logger
from kvbm_core.transports.etcd import EtcdOptions, open_client
from kvbm_core.transports.loop import BackgroundLoop
from kvbm_core.transports.options import reason

log = get_logger("kvbm.registration")

RETRY_S = 1.0


class LeaseLost(Exception):
    """etcd answered a refresh with TTL <= 0: the lease (and the record) is gone."""


class InstanceRegistration:
    """Keeps ``record`` at ``key`` in etcd while the instance lives (see the module docstring)."""

    def __init__(self, options: EtcdOptions, key: str, record: Mapping[str, Any]) -> None:
        self.options = options
        self.key = options.prefix + key
        self.value = json.dumps(record, separators=(",", ":")).encode()
        self.ttl_s = options.registration.lease_ttl_s
        self._client: Any = None
        self._lease: Any = None
        self._lost_reported = False
        self._loop: BackgroundLoop | None = None
        self._stop: asyncio.Event | None = None
        self._runner: Any = None

    def start(self) -> None:
        self._loop = BackgroundLoop("kvbm-registration")
        self._runner = asyncio.run_coroutine_threadsafe(self._run(), self._loop.loop)

    def close(self) -> None:
        """Revoke the lease (the key goes now) and disconnect, within ``timeout_s``."""
        if self._loop is None or self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._shutdown(), self.options.timeout_s)
        except Exception as exc:  # an unreachable etcd: the lease expires by itself
            log.warning("registration: could not revoke the lease; the record expires with it",
                        key=self.key, ttl_s=self.ttl_s, error=reason(exc))
        finally:
            self._loop.stop()

    # ------------------------------------------------------------------------ loop thread
    async def _run(self) -> None:
        self._stop = asyncio.Event()
        timeout = self.options.timeout_s
        while not self._stop.is_set():
            try:
                self._client, endpoint = await open_client(self.options)
                self._lease = await asyncio.wait_for(self._client.lease(self.ttl_s), timeout)
                await asyncio.wait_for(self._client.put(self.key.encode(), self.value, lease=self._lease), timeout)
                log.info("registered in etcd", endpoint=endpoint, key=self.key, ttl_s=self.ttl_s,
                         again=self._lost_reported)
                self._lost_reported = False
                while not await self._stopped_within(self.ttl_s / 3):
                    reply = await asyncio.wait_for(self._lease.refresh(), timeout)
                    if reply is None or reply.TTL <= 0:
                        raise LeaseLost(f"lease {self._lease.id:x} expired")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._lost_reported:
                    self._lost_reported = True
                    log.warning("registration lost (etcd unreachable or lease expired); the engine serves on, "
                                "the record comes back when etcd answers", endpoints=", ".join(self.options.endpoints),
                                error=reason(exc))
                await self._close_client()
                await self._stopped_within(RETRY_S)

    async def _stopped_within(self, seconds: float) -> bool:
        assert self._stop is not None
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        return True

    async def _close_client(self) -> None:
        client, self._client, self._lease = self._client, None, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # closing a broken channel: nothing left to release
                pass

    async def _shutdown(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._runner is not None:
            await asyncio.wrap_future(self._runner)
        try:
            if self._lease is not None:
                await self._lease.revoke()
        finally:
            await self._close_client()
