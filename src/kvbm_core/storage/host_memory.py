"""Page-aligned host memory, pinned for DMA on CUDA machines, usable while it is still being allocated.

``torch.empty(n, pin_memory=True)`` zeroes and pins in one single-threaded driver call (5.3 s for
8 GiB on the H200 machine). :class:`HostMemory` instead maps the whole range at once (anonymous,
page-aligned, so O_DIRECT can read and write it in place; a mapping costs no time until its pages
are touched), asks for transparent huge pages, faults the pages in from several threads at once
and registers them with CUDA (``cudaHostRegister``) segment by segment. A copy must never span two
registered segments, so segments hold whole slots: :attr:`HostMemory.segment_bytes` is what
callers split their copies at.

**Progressive start.** With ``start_bytes`` the constructor returns once the first segments
covering that many bytes are populated and registered (one 512 MiB segment by default in the host
tier: about 0.1 s at the 6-8 GB/s the H200 machine populated and registered 8-48 GB with 16
threads, whatever the tier's size; 0.5 s is the budget before the engine serves). The
other segments are populated and registered by ``grow_threads`` background threads, claimed in
slot order. :attr:`HostMemory.ready_bytes` is the usable prefix: it only grows, and only across
whole segments, so every byte below it is populated and (on CUDA) registered. A background failure
is logged with the memory's label and stops growth; the prefix stays valid.
:meth:`HostMemory.close` stops the growth (waiting, bounded, for the segments in progress),
unregisters every segment that was registered and unmaps.

The background threads register with the thread's CUDA stream-capture mode relaxed, so that a
registration never breaks a CUDA graph another thread of the engine is capturing (PyTorch captures
in the global mode, which forbids such calls from any thread). Where the runtime cannot be reached
through ctypes to relax it, the whole range is registered before the constructor returns.

Without CUDA the memory stays pageable (populated progressively the same way); that is logged once
per process. This module owns no tier logic: tiers (host pool) and bounce buffers (disk tier) both
build on it.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import math
import mmap
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import structlog
import torch

from kvbm_core.errors import StorageError

log = structlog.get_logger("kvbm.storage.host_memory")

PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20
POPULATE_CALL_BYTES = 8 << 20
"""Bytes faulted in by one ``madvise`` call. The kernel holds the process's mmap lock for a whole
call, and any thread that maps or unmaps memory meanwhile (a new thread's stack, a large malloc, a
CUDA allocation) waits for it: small calls keep that wait short while the engine serves."""
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; older kernels answer EINVAL and we touch pages instead
_CUDA_HOST_REGISTER_PORTABLE = 1
_CUDA_STREAM_CAPTURE_MODE_RELAXED = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int

_pageable_logged = threading.Event()


@dataclass(frozen=True)
class AllocationStats:
    """How long each phase of the part allocated before the constructor returned took.

    ``nbytes`` is that part (the whole range unless the memory grows in the background); ``gbps``
    is ``nbytes`` over the total, in GB/s.
    """

    nbytes: int
    map_s: float
    populate_s: float
    register_s: float
    pinned: bool
    segments: int
    threads: int

    @property
    def total_s(self) -> float:
        return self.map_s + self.populate_s + self.register_s

    @property
    def gbps(self) -> float:
        return self.nbytes / self.total_s / 1e9 if self.total_s > 0 else float("inf")


def cuda_pinning_available(device: torch.device | None) -> bool:
    """Whether memory for ``device`` should be pinned: a CUDA device on a machine with CUDA."""
    return device is not None and device.type == "cuda" and torch.cuda.is_available()


class _CudaRuntime:
    """``cudaHostRegister``/``cudaHostUnregister`` of the CUDA runtime torch loaded.

    Called through ctypes (which releases the GIL, so segments register in parallel) when the
    runtime library is found among the process's mappings; otherwise through ``torch.cuda.cudart()``,
    which cannot relax a thread's stream-capture mode (:attr:`can_relax_capture` is then False).
    """

    _lock = threading.Lock()
    _instance: "_CudaRuntime | None" = None

    def __init__(self) -> None:
        torch.cuda.init()
        self._lib = None
        path = _mapped_library("libcudart.so")
        if path is not None:
            lib = ctypes.CDLL(path)
            lib.cudaHostRegister.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
            lib.cudaHostRegister.restype = ctypes.c_int
            lib.cudaHostUnregister.argtypes = (ctypes.c_void_p,)
            lib.cudaHostUnregister.restype = ctypes.c_int
            lib.cudaThreadExchangeStreamCaptureMode.argtypes = (ctypes.POINTER(ctypes.c_int),)
            lib.cudaThreadExchangeStreamCaptureMode.restype = ctypes.c_int
            self._lib = lib

    @classmethod
    def get(cls) -> "_CudaRuntime":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    @property
    def can_relax_capture(self) -> bool:
        return self._lib is not None

    def relax_capture(self) -> None:
        """Let the calling thread register memory while another thread captures a CUDA graph."""
        assert self._lib is not None
        mode = ctypes.c_int(_CUDA_STREAM_CAPTURE_MODE_RELAXED)
        code = int(self._lib.cudaThreadExchangeStreamCaptureMode(ctypes.byref(mode)))
        if code != 0:
            raise RuntimeError(f"cudaThreadExchangeStreamCaptureMode failed with CUDA error {code}")

    def register(self, ptr: int, nbytes: int, device: torch.device) -> int:
        torch.cuda.set_device(device)
        if self._lib is not None:
            return int(self._lib.cudaHostRegister(ptr, nbytes, _CUDA_HOST_REGISTER_PORTABLE))
        return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _CUDA_HOST_REGISTER_PORTABLE))

    def unregister(self, ptr: int) -> int:
        if self._lib is not None:
            return int(self._lib.cudaHostUnregister(ptr))
        return int(torch.cuda.cudart().cudaHostUnregister(ptr))


def _register_result(future: "Future[int]") -> int | str:
    """The CUDA error code of one registration, or the exception text where it raised."""
    try:
        return future.result()
    except Exception as exc:  # reported with the others, after the successful ones are undone
        return repr(exc)


def _mapped_library(stem: str) -> str | None:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if os.path.basename(path).startswith(stem):
                    return path
    except OSError:
        return None
    return None


class HostMemory:
    """``nbytes`` of page-aligned anonymous memory, exposed as one flat uint8 tensor.

    ``segment_bytes`` (rounded to whole ``unit_bytes``) is the registration granularity: CUDA sees
    each segment as its own pinned allocation, so a single copy must stay inside one segment.
    ``start_bytes`` (None: all of it) is what the constructor makes usable before it returns,
    rounded up to whole segments (at least one); ``grow_threads`` threads (default: half of
    ``threads``, leaving cores to the engine that serves meanwhile) add the rest in the background
    (``paused``: only once :meth:`resume_growth` is called). Only the first :attr:`ready_bytes`
    bytes may be used. ``close_timeout_s`` bounds how long :meth:`close` waits for segments in
    progress.
    """

    def __init__(
        self,
        nbytes: int,
        *,
        device: torch.device | None,
        unit_bytes: int = PAGE,
        segment_target_bytes: int = 512 << 20,
        threads: int | None = None,
        label: str = "host memory",
        start_bytes: int | None = None,
        grow_threads: int | None = None,
        paused: bool = False,
        close_timeout_s: float = 30.0,
    ) -> None:
        if nbytes <= 0:
            raise StorageError(label, f"cannot allocate {nbytes} bytes")
        t0 = time.perf_counter()
        self.nbytes = nbytes
        self.label = label
        self.device = device
        units_per_segment = max(1, segment_target_bytes // max(unit_bytes, 1))
        self.segment_bytes = min(nbytes, units_per_segment * unit_bytes)
        self.close_timeout_s = close_timeout_s
        self._starts = list(range(0, nbytes, self.segment_bytes))
        self._registered: list[int] = []  # segment starts, in any order
        self._cv = threading.Condition()
        self._ready_segments = 0
        self._done = [False] * len(self._starts)
        self._next = 0  # the next segment a background thread claims
        self._running = 0  # background segments in progress
        self._paused = paused
        self._stopping = False
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._t0 = t0
        self.growth_error: str | None = None
        self.full_s: float | None = None
        threads = threads or min(16, os.cpu_count() or 1)

        self.pinned = cuda_pinning_available(device)
        self._runtime: _CudaRuntime | None = None
        if self.pinned:
            assert device is not None
            if device.index is None:
                self.device = device = torch.device("cuda", torch.cuda.current_device())
            self._runtime = _CudaRuntime.get()
        first = len(self._starts)
        if start_bytes is not None:
            first = min(first, max(1, math.ceil(start_bytes / self.segment_bytes)))
        if first < len(self._starts) and self._runtime is not None and not self._runtime.can_relax_capture:
            log.info("the CUDA runtime is not reachable through ctypes: registering all host memory at start, "
                     "never while the engine may capture a CUDA graph", label=label)
            first = len(self._starts)

        try:
            self._map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError as exc:
            raise StorageError(label, f"cannot map {nbytes} bytes of host memory: {exc}") from exc
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # transparent huge pages switched off: plain pages work too
                pass
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.address = self.tensor.data_ptr()
        t1 = time.perf_counter()

        start_end = self._end(first - 1)
        chunk = -(-max(1, start_end // threads) // HUGE_PAGE) * HUGE_PAGE
        chunks = [(s, min(chunk, start_end - s)) for s in range(0, start_end, chunk)]
        sync_threads = max(1, min(threads, max(len(chunks), first)))
        with ThreadPoolExecutor(sync_threads, thread_name_prefix="kvbm-host-alloc") as pool:
            try:
                list(pool.map(lambda c: self._populate(*c), chunks))
            except StorageError:
                self._unmap()
                raise
            t2 = time.perf_counter()
            if self._runtime is not None:
                assert device is not None
                starts = self._starts[:first]
                register = self._runtime.register
                futures = [pool.submit(register, self.address + s, self._len(s), device) for s in starts]
                errors = [(s, _register_result(f)) for s, f in zip(starts, futures)]
                # Every segment that did register is unregistered on failure: a registration left
                # behind on memory that is later unmapped makes the next mapping fail with error 712.
                self._registered = [s for s, err in errors if err == 0]
                failed = [err for _, err in errors if err != 0]
                if failed:
                    self.close()
                    raise StorageError(label, f"cudaHostRegister failed with CUDA error {failed[0]} "
                                              f"for {len(failed)} of {len(starts)} segments")
        t3 = time.perf_counter()
        if not self.pinned and not _pageable_logged.is_set():
            _pageable_logged.set()
            log.info("no CUDA device: host memory stays pageable (not pinned)", label=label)
        self.stats = AllocationStats(start_end, t1 - t0, t2 - t1, t3 - t2, self.pinned, first, sync_threads)
        self._ready_segments = self._next = first
        self._done[:first] = [True] * first
        if first == len(self._starts):
            self.full_s = t3 - t0
            return
        grow_threads = max(1, min(grow_threads or max(1, threads // 2), len(self._starts) - first))
        _live.add(self)
        for i in range(grow_threads):
            thread = threading.Thread(target=self._grow, name=f"kvbm-host-grow-{i}", daemon=True)
            self._threads.append(thread)
            thread.start()

    # ------------------------------------------------------------------------------ readiness
    @property
    def ready_bytes(self) -> int:
        """Leading bytes that are populated and (on CUDA) registered now; never decreases. Nothing
        is usable once :meth:`close` was called, whatever this says."""
        return self._end(self._ready_segments - 1) if self._ready_segments else 0

    @property
    def growing(self) -> bool:
        """Whether background threads may still add to :attr:`ready_bytes`."""
        with self._cv:
            return self._growing()

    def _growing(self) -> bool:
        return self._ready_segments < len(self._starts) and not self._stopping

    def wait_ready(self, nbytes: int, timeout: float) -> int:
        """Wait until ``nbytes`` bytes are ready, growth stopped (finished, failed or closed), or
        ``timeout`` seconds passed; returns :attr:`ready_bytes`."""
        want = min(nbytes, self.nbytes)
        with self._cv:
            self._cv.wait_for(lambda: self.ready_bytes >= want or not self._growing(), timeout)
            return self.ready_bytes

    def resume_growth(self) -> None:
        """Start the background growth of memory built with ``paused=True`` (idempotent)."""
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    # ---------------------------------------------------------------------------- background
    def _grow(self) -> None:
        """One background thread: claim the next segment in slot order, populate and register it."""
        if self._runtime is not None:
            try:
                self._runtime.relax_capture()
            except Exception as exc:
                self._fail(-1, f"cannot relax the CUDA stream-capture mode: {exc!r}")
                return
        while True:
            with self._cv:
                self._cv.wait_for(lambda: not self._paused or self._stopping)
                if self._stopping or self._next >= len(self._starts):
                    return
                index = self._next
                self._next += 1
                self._running += 1
            try:
                problem = self._grow_segment(index)
            except Exception as exc:  # reported like a failed registration: growth stops, the prefix stays
                problem = f"{type(exc).__name__}: {exc}"
            completed = False
            with self._cv:
                self._running -= 1
                if problem is None:
                    self._done[index] = True
                    while self._ready_segments < len(self._done) and self._done[self._ready_segments]:
                        self._ready_segments += 1
                    if self._ready_segments == len(self._starts) and self.full_s is None:
                        self.full_s = time.perf_counter() - self._t0
                        completed = True
                self._cv.notify_all()
            if completed:
                log.info("host memory fully usable", label=self.label, gb=round(self.nbytes / 1e9, 3),
                         pinned=self.pinned, seconds=round(self.full_s or 0.0, 3))
            if problem is not None:
                self._fail(index, problem)
                return

    def _grow_segment(self, index: int) -> str | None:
        """Populate and register segment ``index``; the problem, or None. Skips work once stopping."""
        start = self._starts[index]
        if not self._populate(start, self._len(start), stoppable=True):
            return "stopped"
        if self._runtime is None:
            return None
        with self._cv:
            if self._stopping:
                return "stopped"
        assert self.device is not None
        code = self._runtime.register(self.address + start, self._len(start), self.device)
        if code != 0:
            return f"cudaHostRegister failed with CUDA error {code}"
        with self._cv:
            self._registered.append(start)
        return None

    def _fail(self, index: int, problem: str) -> None:
        with self._cv:
            if self._stopping:  # closing: a segment cut short is not a failure
                return
            self._stopping = True
            self.growth_error = problem
            self._cv.notify_all()
        log.error("host memory stopped growing; the part already usable stays in use", label=self.label,
                  segment=index, error=problem, ready_gb=round(self.ready_bytes / 1e9, 3),
                  total_gb=round(self.nbytes / 1e9, 3))

    def stop_growth(self, timeout: float) -> bool:
        """Stop the background growth and wait (at most ``timeout`` s) for segments in progress;
        whether none is left running."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            idle = self._cv.wait_for(lambda: self._running == 0, timeout)
        if idle:
            for thread in self._threads:  # each has nothing left but to return
                thread.join(timeout=timeout)
        return idle

    # ----------------------------------------------------------------------------- helpers
    def _len(self, start: int) -> int:
        return min(self.segment_bytes, self.nbytes - start)

    def _end(self, index: int) -> int:
        """The end of segment ``index`` (0 for ``index`` -1)."""
        return 0 if index < 0 else self._starts[index] + self._len(self._starts[index])

    def _populate(self, start: int, length: int, stoppable: bool = False) -> bool:
        """Fault in ``length`` bytes (MADV_POPULATE_WRITE, or one write per page on older kernels),
        :data:`POPULATE_CALL_BYTES` at a time; False if ``stoppable`` and growth stopped first."""
        for offset in range(start, start + length, POPULATE_CALL_BYTES):
            if stoppable and self._stopping:
                return False
            address, size = self.address + offset, min(POPULATE_CALL_BYTES, start + length - offset)
            if _libc.madvise(address, size, _MADV_POPULATE_WRITE) == 0:
                continue
            code = ctypes.get_errno()
            if code != errno.EINVAL:  # out of memory, or the range is gone: touching the pages would not help
                raise StorageError(self.label, f"cannot fault in {size} bytes of host memory: {os.strerror(code)}")
            ctypes.memset(address, 0, size)
        return True

    def close(self) -> None:
        """Stop growing, unregister and unmap (idempotent). Views still alive keep the mapping
        (pageable) until collected. If a segment in progress does not finish within
        ``close_timeout_s``, the memory is left registered and mapped (an error is logged): a thread
        still writing to it must never find it unmapped."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
        if not self.stop_growth(self.close_timeout_s):
            log.error("host memory growth did not stop in time; leaving it mapped", label=self.label,
                      timeout_s=self.close_timeout_s)
            return
        _live.discard(self)
        if self._registered:
            assert self._runtime is not None
            for start in self._registered:
                self._runtime.unregister(self.address + start)
            self._registered = []
        self._unmap()

    def _unmap(self) -> None:
        self.tensor = torch.empty(0, dtype=torch.uint8)
        try:
            self._map.close()
        except BufferError:
            log.debug("host memory still referenced; unmapped when the last view is dropped", label=self.label)


_live: "weakref.WeakSet[HostMemory]" = weakref.WeakSet()
"""Memories whose background growth may still run."""


@atexit.register
def _stop_growth_at_exit() -> None:
    """At interpreter exit, stop background growth (bounded) before CUDA is torn down; what was
    registered stays registered, as copies may still use it."""
    for memory in list(_live):
        memory.stop_growth(timeout=memory.close_timeout_s)
