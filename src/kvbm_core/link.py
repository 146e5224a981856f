"""The link between the leader and the workers of the other ranks.

TensorRT-LLM gives a connector one path from the leader to the workers (the metadata it broadcasts
every step) and none back. kvbm needs two more: every rank's operation results must reach the
leader (a block is readable only once every rank wrote its shard; a block that failed on any rank
is dropped everywhere), and the leader must be able to ask every rank to do something now and wait
for the answer (stage disk blocks into host memory and verify them before promising them).

Rank 0's worker shares the leader's process and talks to it through memory
(:mod:`kvbm_core.channel`). The other ranks connect to a socket the leader listens on, with
``multiprocessing.connection``: messages are pickled Python values, and the connection is
authenticated with a 32-byte secret the leader makes up and sends, with the address, in the
worker configuration of the first step's metadata (TensorRT-LLM's MPI broadcast, which the engine
already trusts). Messages:

- worker -> leader: ``("hello", rank)`` once, then ``("results", [OpResult, ...])``,
  ``("ready", TierReady)`` and ``("reply", call_id, value_or_exception)``;
- leader -> worker: ``("call", call_id, method, args)``.

Every wait is bounded; a rank that cannot connect keeps retrying in the background until its
worker closes, and the leader logs which ranks it is still missing.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import structlog

from kvbm_core.errors import KvbmError
from kvbm_core.ops import OpResult, TierReady

log = structlog.get_logger("kvbm.link")

CONNECT_RETRY_S = 0.2
"""Pause between a worker's attempts to reach the leader."""


class LinkError(KvbmError):
    """A call over the link failed: a rank is not connected, went away, raised, or did not answer."""


@dataclass(frozen=True)
class LinkAddress:
    """Where the leader listens, and the secret that lets a worker in."""

    host: str
    port: int
    authkey: bytes

    def __repr__(self) -> str:  # never print the secret
        return f"LinkAddress({self.host}:{self.port})"


class LeaderLink:
    """The leader's end: accepts workers, hands their results to ``on_results``, calls them."""

    def __init__(self, on_results: Callable[[list[OpResult]], None], on_ready: Callable[[TierReady], None],
                 host: str = "127.0.0.1") -> None:
        self._on_results = on_results
        self._on_ready = on_ready
        authkey = os.urandom(32)
        self._listener = Listener((host, 0), authkey=authkey)
        self.address = LinkAddress(host, self._listener.address[1], authkey)
        self._lock = threading.Lock()
        self._ranks: dict[int, _Peer] = {}
        self._calls: dict[int, Future[Any]] = {}
        self._ids = itertools.count(1)
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="kvbm-link-accept", daemon=True).start()

    @property
    def connected_ranks(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._ranks)

    def call(self, ranks: Iterable[int], method: str, args: tuple, timeout: float) -> dict[int, Any]:
        """Call ``method(*args)`` on each of ``ranks`` and wait for every answer (at most ``timeout``)."""
        return self.wait(self.start_call(ranks, method, args), method, timeout)

    def wait(self, pending: dict[int, Future[Any]], method: str, timeout: float) -> dict[int, Any]:
        """The answers of :meth:`start_call`'s calls; :class:`LinkError` for one that failed or is late."""
        deadline = time.monotonic() + timeout
        out: dict[int, Any] = {}
        for rank, future in pending.items():
            try:
                out[rank] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                raise LinkError(f"rank {rank} did not answer {method} within {timeout:.1f} s") from None
        return out

    def start_call(self, ranks: Iterable[int], method: str, args: tuple) -> dict[int, Future[Any]]:
        """Send ``method(*args)`` to each of ``ranks``; their answers arrive in the returned futures."""
        pending: dict[int, Future[Any]] = {}
        for rank in ranks:
            with self._lock:
                peer = self._ranks.get(rank)
                call_id = next(self._ids)
                future: Future[Any] = Future()
                self._calls[call_id] = future
            if peer is None:
                future.set_exception(LinkError(f"rank {rank} is not connected to the kvbm leader"))
            else:
                peer.send(("call", call_id, method, args), future)
            pending[rank] = future
        return pending

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            peers = list(self._ranks.values())
            self._ranks.clear()
            calls = list(self._calls.values())
            self._calls.clear()
        for peer in peers:
            peer.close()
        for future in calls:
            if not future.done():
                future.set_exception(LinkError("the kvbm leader closed"))

    # ------------------------------------------------------------------------------ threads
    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn = self._listener.accept()
            except Exception:  # a failed handshake (wrong secret) or the listener closed
                if self._closed.is_set():
                    return
                log.warning("a connection to the kvbm leader was refused (failed authentication)")
                continue
            threading.Thread(target=self._serve, args=(conn,), name="kvbm-link-leader", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        rank = None
        try:
            kind, rank = conn.recv()
            if kind != "hello" or not isinstance(rank, int):
                raise LinkError(f"expected a hello, got {kind!r}")
            peer = _Peer(conn)
            with self._lock:
                self._ranks[rank] = peer
            log.info("kvbm worker connected", rank=rank)
            while True:
                message = conn.recv()
                if message[0] == "results":
                    self._on_results(message[1])
                elif message[0] == "ready":
                    self._on_ready(message[1])
                elif message[0] == "reply":
                    with self._lock:
                        future = self._calls.pop(message[1], None)
                    if future is not None and not future.done():
                        value = message[2]
                        if isinstance(value, BaseException):
                            future.set_exception(LinkError(f"rank {rank}: {type(value).__name__}: {value}"))
                        else:
                            future.set_result(value)
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("kvbm link to a worker failed", rank=rank)
        finally:
            with self._lock:
                if rank is not None and self._ranks.get(rank) is not None and self._ranks[rank].conn is conn:
                    del self._ranks[rank]
            conn.close()
            if not self._closed.is_set() and rank is not None:
                log.warning("kvbm worker disconnected", rank=rank)


class WorkerLink:
    """A worker's end: connects to the leader (retrying), sends results, answers calls with ``handler``."""

    def __init__(self, address: LinkAddress, rank: int, handler: Callable[[str, tuple], Any]) -> None:
        self.address = address
        self.rank = rank
        self._handler = handler
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._backlog: list[OpResult] = []
        self._ready: dict[str, TierReady] = {}  # the latest of each tier, sent again on (re)connection
        self._closed = threading.Event()
        self.connected = threading.Event()
        threading.Thread(target=self._run, name=f"kvbm-link-r{rank}", daemon=True).start()

    def send_results(self, results: list[OpResult]) -> None:
        """Send now if connected; otherwise keep them until the connection is up."""
        if not results:
            return
        with self._lock:
            if self._conn is None:
                self._backlog.extend(results)
                return
            try:
                self._conn.send(("results", results))
            except (OSError, ValueError):
                self._backlog.extend(results)

    def send_ready(self, ready: TierReady) -> None:
        """Tell the leader how much of a tier is usable; kept and sent once connected."""
        with self._lock:
            self._ready[ready.kind] = ready
            if self._conn is None:
                return
            try:
                self._conn.send(("ready", ready))
            except (OSError, ValueError):
                pass  # sent again when the connection is back

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _run(self) -> None:
        addr = self.address
        attempts = 0
        while not self._closed.is_set():
            try:
                conn = Client((addr.host, addr.port), authkey=addr.authkey)
            except OSError as exc:
                attempts += 1
                if attempts == 1 or attempts % 50 == 0:
                    log.warning("cannot reach the kvbm leader yet; retrying", rank=self.rank,
                                address=f"{addr.host}:{addr.port}", error=str(exc))
                time.sleep(CONNECT_RETRY_S)
                continue
            with self._lock:
                conn.send(("hello", self.rank))
                backlog, self._backlog = self._backlog, []
                if backlog:
                    conn.send(("results", backlog))
                for ready in self._ready.values():
                    conn.send(("ready", ready))
                self._conn = conn
            self.connected.set()
            self._serve(conn)
            return

    def _serve(self, conn: Connection) -> None:
        try:
            while not self._closed.is_set():
                kind, call_id, method, args = conn.recv()
                if kind != "call":
                    continue
                try:
                    value: Any = self._handler(method, args)
                except Exception as exc:
                    value = exc
                with self._lock:
                    conn.send(("reply", call_id, value))
        except (EOFError, OSError):
            if not self._closed.is_set():
                log.warning("the kvbm leader went away", rank=self.rank)


class _Peer:
    """One connected worker as the leader sees it: its connection and a lock around sends."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple, future: Future[Any]) -> None:
        try:
            with self._lock:
                self.conn.send(message)
        except (OSError, ValueError) as exc:
            future.set_exception(LinkError(f"sending to a worker failed: {exc}"))

    def close(self) -> None:
        self.conn.close()
