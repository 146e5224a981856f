"""An asyncio event loop on a daemon thread, so that synchronous kvbm code can use async clients.

The connector runs in TRT-LLM's threads, not inside an event loop; the etcd and NATS clients are
asyncio-only. Each transport owns one :class:`BackgroundLoop` and submits coroutines to it with a
bounded wait: a server that stops answering becomes a :class:`TimeoutError`, never a hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundLoop:
    """One event loop running forever on its own daemon thread until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        """Run ``coro`` on the loop and wait at most ``timeout_s`` seconds for its result."""
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("the transport is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer within {timeout_s:g} s") from None

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel what is still pending, stop the loop and join its thread. Safe to call twice."""
        if self.loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(_cancel_others(), self.loop).result(timeout_s)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass  # a task that ignores cancellation: stop the loop regardless
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_others() -> None:
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
