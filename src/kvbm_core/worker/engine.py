"""The transfer engine: executes the leader's operations on one rank's bytes, by slot index.

Where each route runs:

==========  ==========================================================================
D2H         store stream, after the forward-end event
H2D         load stream, layer by layer where batched copies exist: the compute stream waits
            for layer ``l``'s copies only before layer ``l`` (:meth:`TransferEngine.wait_layer`),
            so later layers copy while earlier ones compute; else the whole load before the
            forward pass. GPU-side waits, no host sync
H2DISK      I/O thread pool: host rows straight to the file (page-aligned rows need no copy)
DISK2H      I/O thread pool: file -> staging lane, verify, copy the verified blocks into host
            slots; run at once for the leader (:meth:`TransferEngine.run_now`)
D2DISK      I/O thread pool, after the forward-end event: device -> staging lane, stamp, write
==========  ==========================================================================

Every operation is one :class:`Ticket`. Tickets wait for earlier tickets touching the same slots or
device blocks (:mod:`kvbm_core.worker.hazards`): stream tickets wait host-side only for the moment the earlier
ticket is *issued*, i.e. its copies are enqueued (the GPU-side wait is ``wait_event``); I/O
tickets are submitted only once every ticket they wait for is issued, so pool threads never block
on each other. A ticket is done when it is issued and its CUDA event (if any)
has completed; :meth:`TransferEngine.poll` reports each done ticket once as an :class:`OpResult`.

The engine's own writes: kvbm does not pin a finished request's device blocks, so a block a store
still reads may be handed to another request. Before a step's forward pass,
:meth:`TransferEngine.order_engine_writes` makes the compute stream wait (on CPU: the caller) for
every operation of this rank still touching the blocks the engine handed out in that step.
A failure (an exception, a block that fails verification, a read of a slot whose write failed, a
blocking load that missed the forward pass) marks the op failed and is never counted as done.

Issuing: on CUDA, a stream ticket whose dependencies are all issued is issued in the calling thread
(the engine's caller: ``start_load_kv``, ``get_finished``): issuing only enqueues copies, and a
blocking load is waited for by the caller anyway, so a hop to another thread would only add a
thread wake-up and a GIL handoff to the step. A ticket that must wait goes to its lane's thread,
and so does every later ticket of that lane while the thread has work, so the stream still sees
tickets in submission order. With a CPU pool (CI) copies are real work and always run in the
lanes' threads; no CUDA is touched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # the builtin one only from 3.11

import numpy as np
import structlog
import torch

from kvbm_core.errors import ConfigError
from kvbm_core.interfaces import StorageTier, TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.ops import BACKGROUND, LOADS, STAGING, STORES, Op, OpResult, Route
from kvbm_core.storage import BlockFileStorage, HostStorage, ReadCheck, TierIOError
from kvbm_core.worker.copies import BlockCopier, coalesce
from kvbm_core.worker.hazards import SlotHazards

log = structlog.get_logger("kvbm.worker.engine")


class Ticket:
    """One operation in flight on this rank."""

    def __init__(self, ticket_id: int, op: Op, cuda: bool) -> None:
        self.id = ticket_id
        self.op = op
        self.issued: Future[None] = Future()
        self.event: torch.cuda.Event | None = None
        self.layer_events: list[torch.cuda.Event] = []  # H2D copied layer by layer: one per layer
        self.timing: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self.cuda = cuda
        self.failed: dict[int, str] = {}
        self.error = ""
        self.device_failed = False
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.pieces_left = 0
        self.lock = threading.Lock()

    # ------------------------------------------------------------------------------ state
    def fail(self, positions: Sequence[int] | np.ndarray, reason: str) -> None:
        with self.lock:
            for p in np.asarray(positions, dtype=np.int64).tolist():
                self.failed.setdefault(int(p), reason)
            if not self.error:
                self.error = reason

    def fail_all(self, reason: str) -> None:
        self.fail(np.arange(self.op.num_blocks), reason)

    def failed_by(self, exc: Exception, positions: Sequence[int] | np.ndarray | None = None) -> None:
        """Fail ``positions`` (all when None) because of ``exc``; remember a failing device."""
        if isinstance(exc, TierIOError) and exc.device_failed:
            self.device_failed = True
        reason = f"{type(exc).__name__}: {exc}"
        self.fail(np.arange(self.op.num_blocks) if positions is None else positions, reason)

    def started(self) -> None:
        with self.lock:
            if self.t_start is None:
                self.t_start = time.perf_counter()

    def finish_issue(self) -> None:
        self.t_end = time.perf_counter()
        if not self.issued.done():
            self.issued.set_result(None)

    def done(self) -> bool:
        return self.issued.done() and (self.event is None or self.event.query())

    def ok_mask(self) -> np.ndarray:
        ok = np.ones(self.op.num_blocks, dtype=bool)
        ok[list(self.failed)] = False
        return ok

    def result(self, bytes_per_block: int, rank: int) -> OpResult:
        if self.timing is not None:
            seconds = self.timing[0].elapsed_time(self.timing[1]) / 1e3
        else:
            seconds = (self.t_end or 0.0) - (self.t_start or self.t_end or 0.0)
        ok_blocks = self.op.num_blocks - len(self.failed)
        return OpResult(
            op_id=self.op.op_id,
            ok=not self.failed,
            rank=rank,
            request_id=self.op.request_id,
            num_bytes=ok_blocks * bytes_per_block,
            seconds=max(seconds, 0.0),
            error=self.error,
            failed_blocks=tuple(sorted(self.failed)),
            device_failed=self.device_failed,
        )


class _StreamLane:
    """One copy direction: its CUDA stream, and a thread that issues onto it when the caller cannot."""

    def __init__(self, name: str, device: torch.device, cuda: bool, initializer: Callable[[], None]) -> None:
        self.stream = torch.cuda.Stream(device) if cuda else None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=initializer)
        self._lock = threading.Lock()
        self._queued = 0  # calls handed to the thread and not yet finished

    def run(self, call: Callable[[], None], *, ready: bool) -> None:
        """``call`` now in this thread if ``ready`` (nothing to wait for), on CUDA, and the thread
        has nothing queued; otherwise in the thread, after what is queued there."""
        with self._lock:
            inline = ready and self.stream is not None and self._queued == 0
            if not inline:
                self._queued += 1
        if inline:
            call()
        else:
            self._thread.submit(self._call_queued, call)

    def _call_queued(self, call: Callable[[], None]) -> None:
        try:
            call()
        finally:
            with self._lock:
                self._queued -= 1

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


class TransferEngine:
    """Moves blocks between the KV pool and this rank's tiers (see the module docstring).

    ``pool`` is TRT-LLM's primary pool ``[num_blocks, layers, kv, ...]`` (contiguous), on CUDA in
    production or on CPU in tests. ``copy_strategy`` is ``auto``, ``batch`` or ``runs``
    (:mod:`kvbm_core.worker.copies`); ``wait_timeout_s`` bounds every wait of the engine.
    """

    def __init__(self, pool: torch.Tensor, layout: BlockLayout, tiers: Mapping[TierLevel, StorageTier], *,
                 rank: int, io_threads: int | None = None, copy_strategy: str = "auto",
                 wait_timeout_s: float = 120.0) -> None:
        self.rank = rank
        self.layout = layout
        self.bpb = layout.bytes_per_block
        self.pool = pool.reshape(pool.shape[0], -1).view(torch.uint8)
        if self.pool.shape[1] != self.bpb:
            raise ConfigError("register_kv_caches", f"pool rows have {self.pool.shape[1]} bytes, layout says {self.bpb}")
        self.device = pool.device
        self.cuda = pool.is_cuda
        self.wait_timeout_s = wait_timeout_s
        self.host = tiers.get(TierLevel.HOST)
        self.disk = tiers.get(TierLevel.DISK)
        if self.host is not None and not isinstance(self.host, HostStorage):
            raise ConfigError("tiers", f"host tier {self.host.name!r} does not implement HostStorage")
        if self.disk is not None and not isinstance(self.disk, BlockFileStorage):
            raise ConfigError("tiers", f"disk tier {self.disk.name!r} does not implement BlockFileStorage")
        self._host_hz = SlotHazards(self.host.context.num_slots) if self.host is not None else None
        self._disk_hz = SlotHazards(self.disk.context.num_slots) if self.disk is not None else None
        self._device_hz = SlotHazards(int(self.pool.shape[0]))
        self.copier = BlockCopier(self.device, copy_strategy)
        self.num_layers = layout.num_layers
        #: Loads copied layer by layer (see the module docstring); switched off if a forward pass
        #: turns out not to call ``wait_layer`` (:meth:`end_forward`).
        self.pipelined = self.copier.strategy == "batch" and self.num_layers > 1 and self.bpb % self.num_layers == 0
        self._layer_tickets: list[Ticket] = []  # this forward pass's pipelined loads
        self._layers_waited = -1

        self._lock = threading.Lock()
        self._next_id = 0
        self._live: dict[int, Ticket] = {}
        self._by_request: dict[int, list[Ticket]] = {}
        self._local = threading.local()
        self._load_lane = _StreamLane(f"kvbm-load-r{rank}", self.device, self.cuda, self._thread_init)
        self._store_lane = _StreamLane(f"kvbm-store-r{rank}", self.device, self.cuda, self._thread_init)
        threads = io_threads or (self.disk.io_threads if self.disk is not None else 2)
        self._io = ThreadPoolExecutor(threads, thread_name_prefix=f"kvbm-io-r{rank}", initializer=self._thread_init)
        self._closed = False
        log.info("transfer engine ready", rank=rank, device=str(self.device), copies=self.copier.strategy,
                 host=self.host.name if self.host else None, disk=self.disk.name if self.disk else None,
                 disk_mode=self.disk.mode if self.disk else None, io_threads=threads)

    # ------------------------------------------------------------------------- public API
    def start_loads(self, ops: Sequence[Op], stream: torch.cuda.Stream | None) -> dict[int, str]:
        """Onboard H2D ops before the forward pass: the compute ``stream`` waits on them (GPU-side).

        Returns the requests whose load failed (request id -> why): a host slot whose write had
        failed, a copy that raised, or a copy not issued within ``wait_timeout_s``.
        """
        tickets = [self._submit(op, None) for op in ops if self._routed(op, LOADS)]
        deadline = time.monotonic() + self.wait_timeout_s
        compute = stream if stream is not None or not self.cuda else torch.cuda.current_stream(self.device)
        for t in tickets:
            try:
                t.issued.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                t.fail_all(f"load not issued within {self.wait_timeout_s:.0f} s, before its forward pass")
                log.error("a load missed its forward pass", op_id=t.op.op_id, request_id=t.op.request_id)
                continue
            if t.layer_events and compute is not None:
                self._layer_tickets.append(t)  # waited for layer by layer (wait_layer)
            elif t.event is not None and compute is not None:
                compute.wait_event(t.event)
        return {t.op.request_id: f"load operation {t.op.op_id} failed: {t.error}" for t in tickets if t.failed}

    def wait_layer(self, layer: int, stream: torch.cuda.Stream | None) -> None:
        """Make ``stream`` wait for this forward pass's loads of layers ``0 .. layer`` (copies run in
        layer order on one stream, so the event of the last of them covers the others)."""
        if not self._layer_tickets or stream is None or layer <= self._layers_waited:
            return
        last = min(layer, self.num_layers - 1)
        for t in self._layer_tickets:
            stream.wait_event(t.layer_events[last])
        self._layers_waited = last

    def end_forward(self, stream: torch.cuda.Stream | None) -> list[int]:
        """The forward pass is over: the requests whose pipelined loads it did not wait for in full
        (it ran without layer hooks, so it may have read blocks before they arrived). Their loads
        are waited for now, and layer-by-layer loading is switched off for good."""
        tickets, waited = self._layer_tickets, self._layers_waited
        self._layer_tickets, self._layers_waited = [], -1
        if not tickets or waited >= self.num_layers - 1:
            return []
        for t in tickets:
            if stream is not None and t.event is not None:
                stream.wait_event(t.event)
        self.pipelined = False
        log.error("the forward pass did not wait for every layer's load; loading whole blocks from now on",
                  rank=self.rank, layers_waited=waited + 1, layers=self.num_layers)
        return sorted({t.op.request_id for t in tickets})

    def start_stores(self, ops: Sequence[Op], after: torch.cuda.Event | None) -> None:
        """Offload D2H and D2DISK ops once ``after`` (the forward-end event) has completed."""
        for op in ops:
            if self._routed(op, STORES):
                self._submit(op, after)

    def start_background(self, ops: Sequence[Op]) -> None:
        """H2DISK ops, in the I/O thread pool."""
        for op in ops:
            if self._routed(op, BACKGROUND):
                self._submit(op, None)

    def run_now(self, op: Op, timeout: float) -> OpResult:
        """Run one staging op (DISK2H) and wait for it; its result is returned here, not by :meth:`poll`.

        An op that does not finish within ``timeout`` seconds is left to finish in the background
        (its result then comes from :meth:`poll`) and :class:`TimeoutError` is raised.
        """
        self._routed(op, STAGING)
        ticket = self._submit(op, None)
        try:
            ticket.issued.result(timeout=timeout)
        except FutureTimeout:
            raise TimeoutError(f"staging operation {op.op_id} did not finish within {timeout:.1f} s") from None
        with self._lock:
            self._forget(ticket)
        return ticket.result(self.bpb, self.rank)

    def order_engine_writes(self, blocks: np.ndarray, stream: torch.cuda.Stream | None) -> None:
        """Make the engine's next writes to device ``blocks`` come after this rank's operations on them.

        On CUDA the compute ``stream`` waits (GPU-side) for each such operation's copies; on CPU the
        caller waits until it finished. A store not even issued within ``wait_timeout_s`` is marked
        failed instead (so what it copies later is never counted), and the engine goes on.
        """
        blocks = np.asarray(blocks, np.int64)
        if not blocks.size:
            return
        hz = self._device_hz
        with self._lock:
            ids = np.unique(np.concatenate([hz.last_write[blocks], hz.last_stream_read[blocks],
                                            hz.last_host_read[blocks]]))
            tickets = [self._live[i] for i in ids.tolist() if i in self._live]
        deadline = time.monotonic() + self.wait_timeout_s
        for t in tickets:
            if t.done():
                continue
            try:
                t.issued.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                t.fail_all(f"not issued within {self.wait_timeout_s:.0f} s, before the engine reused its device blocks")
                log.error("an operation was overtaken by the engine's writes", op_id=t.op.op_id,
                          route=t.op.route.label)
                continue
            if t.event is None:
                continue
            if stream is not None and self.cuda:
                stream.wait_event(t.event)
            else:
                t.event.synchronize()

    def poll(self) -> list[OpResult]:
        """Operations that completed (ok or failed) since the last poll; never blocks."""
        with self._lock:
            tickets = list(self._live.values())
        finished = [t for t in tickets if t.done()]
        if not finished:
            return []
        with self._lock:
            finished = [t for t in finished if t.id in self._live]  # run_now may have taken one
            for t in finished:
                self._forget(t)
        return [t.result(self.bpb, self.rank) for t in finished]

    def _forget(self, t: Ticket) -> None:
        """Drop a finished ticket from the live set (under ``_lock``)."""
        self._live.pop(t.id, None)
        group = self._by_request.get(t.op.request_id)
        if group is not None and t in group:
            group.remove(t)
            if not group:
                del self._by_request[t.op.request_id]

    @property
    def in_flight(self) -> int:
        """Operations submitted and not yet reported by :meth:`poll`."""
        with self._lock:
            return len(self._live)

    def pending(self, request_id: int) -> bool:
        """Whether an operation of ``request_id`` has not completed on this rank."""
        with self._lock:
            group = list(self._by_request.get(request_id, ()))
        return any(not t.done() for t in group)

    def drain(self, timeout: float) -> list[OpResult]:
        """Wait (at most ``timeout`` seconds) for everything in flight; returns what completed."""
        deadline = time.monotonic() + timeout
        with self._lock:
            tickets = list(self._live.values())
        for t in tickets:
            try:
                t.issued.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                break
            while t.event is not None and not t.event.query() and time.monotonic() < deadline:
                time.sleep(0.0005)
        return self.poll()

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.drain(timeout)
        self._load_lane.shutdown()
        self._store_lane.shutdown()
        self._io.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------ submission
    def _routed(self, op: Op, allowed: frozenset[Route]) -> bool:
        if op.route not in allowed:
            raise ValueError(f"operation {op.op_id}: route {op.route.label} does not belong here "
                             f"(expected one of {sorted(r.label for r in allowed)})")
        return True

    def _submit(self, op: Op, after: torch.cuda.Event | None) -> Ticket:
        src = np.asarray(op.src, dtype=np.int64)
        dst = np.asarray(op.dst, dtype=np.int64)
        with self._lock:
            if self._closed:
                raise RuntimeError("the transfer engine is closed")
            ticket = Ticket(self._next_id, op, self.cuda)
            self._next_id += 1
            self._live[ticket.id] = ticket
            self._by_request.setdefault(op.request_id, []).append(ticket)
            problem = self._check(op, src, dst)
            deps: list[Ticket] = []
            if problem is None:
                deps = [self._live[i] for i in self._register(op.route, src, dst, ticket.id) if i in self._live]
        if problem is not None:
            ticket.fail_all(problem)
            ticket.finish_issue()
            return ticket
        if op.num_blocks == 0:
            ticket.finish_issue()
            return ticket
        route = op.route
        if route in (Route.D2H, Route.H2D):
            lane = self._store_lane if route == Route.D2H else self._load_lane
            copy = self._d2h if route == Route.D2H else self._h2d
            lane.run(lambda: self._run_stream(ticket, deps, lane.stream, lambda: copy(ticket, src, dst, lane.stream),
                                              after), ready=all(d.issued.done() for d in deps))
        else:
            self._when_issued(ticket, deps, lambda: self._run_io(ticket, deps, src, dst, after))
        return ticket

    def _check(self, op: Op, src: np.ndarray, dst: np.ndarray) -> str | None:
        need_host = op.route != Route.D2DISK
        need_disk = op.route in (Route.H2DISK, Route.DISK2H, Route.D2DISK)
        if need_host and self.host is None:
            return f"route {op.route.label} needs a host tier and this rank has none"
        if need_disk and self.disk is None:
            return f"route {op.route.label} needs a disk tier and this rank has none"
        n_dev = self.pool.shape[0]
        sides = {
            Route.D2H: ((src, n_dev, "device block"), (dst, self._host_hz, "host slot")),
            Route.H2D: ((src, self._host_hz, "host slot"), (dst, n_dev, "device block")),
            Route.H2DISK: ((src, self._host_hz, "host slot"), (dst, self._disk_hz, "disk slot")),
            Route.DISK2H: ((src, self._disk_hz, "disk slot"), (dst, self._host_hz, "host slot")),
            Route.D2DISK: ((src, n_dev, "device block"), (dst, self._disk_hz, "disk slot")),
        }[op.route]
        for idx, space, what in sides:
            limit = space if isinstance(space, int) else space.num_slots  # type: ignore[union-attr]
            if idx.size and (idx.min() < 0 or idx.max() >= limit):
                return f"{what} index out of range [0, {limit})"
            ready = self.host.ready_slots if space is self._host_hz else limit  # type: ignore[union-attr]
            if idx.size and idx.max() >= ready:  # a host tier still growing (HostStorage.ready_slots)
                return (f"host slot {int(idx.max())} is not usable yet: host tier "
                        f"{self.host.name!r} has {ready} of {limit} slots ready "  # type: ignore[union-attr]
                        "(the rest is still being allocated)")
        if need_disk and len(op.keys) != op.num_blocks:
            return f"{op.num_blocks} blocks but {len(op.keys)} keys"
        return None

    def _register(self, route: Route, src: np.ndarray, dst: np.ndarray, tid: int) -> np.ndarray:
        host, disk, device = self._host_hz, self._disk_hz, self._device_hz
        if route == Route.D2H:
            return np.union1d(device.read(src, tid, stream=True), host.write(dst, tid))  # type: ignore[union-attr]
        if route == Route.H2D:
            return np.union1d(host.read(src, tid, stream=True), device.write(dst, tid))  # type: ignore[union-attr]
        if route == Route.H2DISK:
            return np.union1d(host.read(src, tid, stream=False), disk.write(dst, tid))  # type: ignore[union-attr]
        if route == Route.D2DISK:
            return np.union1d(device.read(src, tid, stream=False), disk.write(dst, tid))  # type: ignore[union-attr]
        return np.union1d(disk.read(src, tid, stream=False), host.write(dst, tid))  # type: ignore[union-attr]

    def _when_issued(self, ticket: Ticket, deps: list[Ticket], start: Callable[[], None]) -> None:
        """Submit ``start`` to the I/O pool once every dependency is issued (callbacks, no waiting)."""
        waiting = [d for d in deps if not d.issued.done()]
        if not waiting:
            self._io.submit(self._guard, ticket, start)
            return
        remaining = [len(waiting)]
        lock = threading.Lock()

        def one_done(_: Future) -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                self._io.submit(self._guard, ticket, start)

        for d in waiting:
            d.issued.add_done_callback(one_done)

    def _guard(self, ticket: Ticket, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # one failed op must not stop the worker
            ticket.failed_by(exc)
            log.exception("transfer failed", op_id=ticket.op.op_id, route=ticket.op.route.label)
            ticket.finish_issue()

    # ------------------------------------------------------------------------ execution
    def _thread_init(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)

    def _io_stream(self) -> torch.cuda.Stream | None:
        """The calling I/O thread's own CUDA stream (None on CPU)."""
        if not self.cuda:
            return None
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return stream

    def _await_deps(self, ticket: Ticket, deps: list[Ticket], stream: torch.cuda.Stream | None) -> bool:
        """Wait until the dependencies are issued, then order after their GPU work."""
        deadline = time.monotonic() + self.wait_timeout_s
        for d in deps:
            try:
                d.issued.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                ticket.fail_all(f"waited {self.wait_timeout_s:.0f} s for operation {d.op.op_id} on the same slots")
                return False
            if d.event is not None:
                if stream is not None:
                    stream.wait_event(d.event)
                else:
                    d.event.synchronize()
        return True

    def _run_stream(self, ticket: Ticket, deps: list[Ticket], stream: torch.cuda.Stream | None,
                    body: Callable[[], None], after: torch.cuda.Event | None = None) -> None:
        try:
            if self._await_deps(ticket, deps, stream):
                ticket.started()
                if stream is not None:
                    if after is not None:
                        stream.wait_event(after)  # the forward pass wrote the blocks; timing starts after
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    with torch.cuda.stream(stream):
                        start.record(stream)
                        body()
                        end.record(stream)
                    ticket.timing = (start, end)
                    ticket.event = end
                else:
                    body()
        except Exception as exc:
            ticket.fail_all(f"{type(exc).__name__}: {exc}")
            log.exception("transfer failed", op_id=ticket.op.op_id, route=ticket.op.route.label)
        finally:
            ticket.finish_issue()

    def _d2h(self, ticket: Ticket, src: np.ndarray, dst: np.ndarray, stream: torch.cuda.Stream | None) -> None:
        host, hz = self.host, self._host_hz
        assert isinstance(host, HostStorage) and hz is not None
        ok = np.zeros(len(dst), dtype=bool)
        try:
            self.copier.copy(host.slots, dst, self.pool, src, dst_segment=host.segment_slots, stream=stream)
            ok[:] = True
        finally:
            with self._lock:
                hz.written(dst, ok)

    def _h2d(self, ticket: Ticket, src: np.ndarray, dst: np.ndarray, stream: torch.cuda.Stream | None) -> None:
        host, hz = self.host, self._host_hz
        assert isinstance(host, HostStorage) and hz is not None
        with self._lock:
            bad = hz.bad(src)
        if bad.size:
            ticket.fail(bad, "the host slot's last write failed")
        keep = np.ones(len(src), dtype=bool)
        keep[bad] = False
        if not (self.pipelined and stream is not None):
            self.copier.copy(self.pool, dst[keep], host.slots, src[keep], src_segment=host.segment_slots, stream=stream)
            return

        def layer_copied(layer: int) -> None:
            event = torch.cuda.Event()
            event.record(stream)
            ticket.layer_events.append(event)

        self.copier.copy_by_layer(self.pool, dst[keep], host.slots, src[keep], self.num_layers, stream, layer_copied)

    # ------------------------------------------------------------------------------- I/O
    def _run_io(self, ticket: Ticket, deps: list[Ticket], src: np.ndarray, dst: np.ndarray,
                after: torch.cuda.Event | None) -> None:
        """Runs in an I/O thread once the dependencies are issued; fans out one task per piece.

        A piece is a run of consecutive disk slots (one I/O); for H2DISK also of consecutive host
        slots within one pinned segment, so the rows are written straight from the host pool.
        """
        if not self._await_deps(ticket, deps, None):
            ticket.finish_issue()
            return
        ticket.started()
        disk, host = self.disk, self.host
        assert isinstance(disk, BlockFileStorage)
        if ticket.op.route == Route.D2DISK:
            if after is not None:
                after.synchronize()  # the forward pass wrote the blocks
            _, d0, n = coalesce(dst, dst, 0, 0, disk.io_records)
            positions = np.arange(len(dst))
            work = self._d2disk_piece
        elif ticket.op.route == Route.H2DISK:
            assert isinstance(host, HostStorage)
            assert self._host_hz is not None
            keep = np.ones(len(src), dtype=bool)
            with self._lock:
                bad = self._host_hz.bad(src)
            if bad.size:
                ticket.fail(bad, "the host slot's last write failed")
                keep[bad] = False
            _, d0, n = coalesce(src[keep], dst[keep], host.segment_slots, 0, disk.io_records)
            positions = np.flatnonzero(keep)
            work = self._h2disk_piece
        else:
            _, d0, n = coalesce(src, src, 0, 0, disk.io_records)
            positions = np.arange(len(src))
            work = self._disk2h_piece
        firsts = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
        pieces = [(positions[f:f + k], int(d)) for f, k, d in zip(firsts, n, d0)]
        if not pieces:
            ticket.finish_issue()
            return
        ticket.pieces_left = len(pieces)
        for piece_positions, first_slot in pieces:
            self._io.submit(self._run_piece, ticket, work, piece_positions, first_slot, src, dst)

    def _run_piece(self, ticket: Ticket, work: Callable[..., None], positions: np.ndarray, first_slot: int,
                   src: np.ndarray, dst: np.ndarray) -> None:
        try:
            work(ticket, positions, first_slot, src, dst)
        except Exception as exc:
            ticket.failed_by(exc, positions)
            log.warning("transfer piece failed", op_id=ticket.op.op_id, route=ticket.op.route.label,
                        blocks=len(positions), error=str(exc))
        finally:
            with ticket.lock:
                ticket.pieces_left -= 1
                last = ticket.pieces_left == 0
            if last:
                ticket.finish_issue()

    def _lane(self, lanes) -> int:  # type: ignore[no-untyped-def]
        return lanes.acquire(timeout=self.wait_timeout_s)

    def _h2disk_piece(self, ticket: Ticket, positions: np.ndarray, first_slot: int, src: np.ndarray,
                      dst: np.ndarray) -> None:
        disk, host = self.disk, self.host
        assert isinstance(disk, BlockFileStorage) and isinstance(host, HostStorage)
        s = int(src[positions[0]])
        rows = host.slots[s:s + len(positions)]
        lane = self._lane(disk.lanes)
        try:
            disk.write_rows(rows, first_slot, ticket.op.keys[positions], disk.lanes.lane(lane))
        finally:
            disk.lanes.release(lane)

    def _d2disk_piece(self, ticket: Ticket, positions: np.ndarray, first_slot: int, src: np.ndarray,
                      dst: np.ndarray) -> None:
        """Copy a run of device blocks into a staging lane, stamp the records, write them."""
        disk = self.disk
        assert isinstance(disk, BlockFileStorage)
        blocks = src[positions]
        lane_index = self._lane(disk.lanes)
        try:
            lane = disk.lanes.lane(lane_index)
            stream = self._io_stream()
            self.copier.copy(disk.data_view(lane, len(blocks)), np.arange(len(blocks)), self.pool, blocks,
                             stream=stream)
            if stream is not None:
                stream.synchronize()
            disk.write_lane(lane, first_slot, ticket.op.keys[positions])
        finally:
            disk.lanes.release(lane_index)

    def _disk2h_piece(self, ticket: Ticket, positions: np.ndarray, first_slot: int, src: np.ndarray,
                      dst: np.ndarray) -> None:
        """Read a run of records, verify each against its key, copy the good ones into host slots."""
        disk, host, hz = self.disk, self.host, self._host_hz
        assert isinstance(disk, BlockFileStorage) and isinstance(host, HostStorage) and hz is not None
        keys = ticket.op.keys[positions]
        targets = dst[positions]
        ok = np.zeros(len(positions), dtype=bool)
        lane_index = self._lane(disk.lanes)
        try:
            lane = disk.lanes.lane(lane_index)
            check = disk.read_lane(lane, first_slot, keys)
            self._note_check(ticket, positions, check)
            good = np.flatnonzero(check.ok)
            if good.size:
                rows = torch.from_numpy(good)
                host.slots.index_copy_(0, torch.from_numpy(targets[good]), disk.data_view(lane, len(keys))[rows])
            ok[good] = True
        finally:
            disk.lanes.release(lane_index)
            with self._lock:
                hz.written(targets, ok)

    @staticmethod
    def _note_check(ticket: Ticket, positions: np.ndarray, check: ReadCheck) -> None:
        for i, reason in check.reasons.items():
            ticket.fail([positions[i]], reason)
        if check.reasons:
            log.warning("blocks failed verification and were not loaded", op_id=ticket.op.op_id,
                        blocks=len(check.reasons), first=next(iter(check.reasons.values())))
