"""Page-aligned host memory, pinned for DMA on CUDA machines, allocated fast enough to measure.

``torch.empty(n, pin_memory=True)`` zeroes and pins in one single-threaded driver call (5.3 s for
8 GiB on the H200 machine). :class:`HostMemory` instead maps anonymous memory (page-aligned, so
O_DIRECT can read and write it in place), asks for transparent huge pages, faults the pages in from
several threads at once, and registers it with CUDA (``cudaHostRegister``) segment by segment, also in
parallel. A copy must never span two registered segments, so segments hold whole slots:
:attr:`HostMemory.segment_bytes` is what callers split their copies at.

Without CUDA the memory stays pageable; that is logged once per process. This module owns no tier
logic: tiers (host pool) and bounce buffers (disk tier) both build on it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import structlog
import torch

from kvbm_core.errors import StorageError

log = structlog.get_logger("kvbm.storage.host_memory")

PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; older kernels answer EINVAL and we touch pages instead
_CUDA_HOST_REGISTER_PORTABLE = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int

_pageable_logged = threading.Event()


@dataclass(frozen=True)
class AllocationStats:
    """How long each allocation phase took; ``gbps`` is bytes over the total, in GB/s."""

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
    runtime library is found among the process's mappings; otherwise through ``torch.cuda.cudart()``.
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
            self._lib = lib

    @classmethod
    def get(cls) -> "_CudaRuntime":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

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
    ) -> None:
        if nbytes <= 0:
            raise StorageError(label, f"cannot allocate {nbytes} bytes")
        self.nbytes = nbytes
        self.label = label
        self.device = device
        units_per_segment = max(1, segment_target_bytes // max(unit_bytes, 1))
        self.segment_bytes = min(nbytes, units_per_segment * unit_bytes)
        self._registered: list[int] = []
        threads = threads or min(16, os.cpu_count() or 1)

        t0 = time.perf_counter()
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

        starts = list(range(0, nbytes, self.segment_bytes))
        threads = max(1, min(threads, len(starts)))
        with ThreadPoolExecutor(threads, thread_name_prefix="kvbm-host-alloc") as pool:
            list(pool.map(self._populate, starts))
            t2 = time.perf_counter()
            self.pinned = cuda_pinning_available(device)
            if self.pinned:
                assert device is not None
                if device.index is None:
                    device = torch.device("cuda", torch.cuda.current_device())
                runtime = _CudaRuntime.get()
                futures = [pool.submit(runtime.register, self.address + s, self._len(s), device) for s in starts]
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
        self.stats = AllocationStats(nbytes, t1 - t0, t2 - t1, t3 - t2, self.pinned, len(starts), threads)

    def _len(self, start: int) -> int:
        return min(self.segment_bytes, self.nbytes - start)

    def _populate(self, start: int) -> None:
        """Fault in one segment: MADV_POPULATE_WRITE, or one write per page on older kernels."""
        length = self._len(start)
        if _libc.madvise(self.address + start, length, _MADV_POPULATE_WRITE) == 0:
            return
        ctypes.memset(self.address + start, 0, length)

    def close(self) -> None:
        """Unregister and unmap. Views still alive keep the mapping (pageable) until collected."""
        if self._registered:
            runtime = _CudaRuntime.get()
            for start in self._registered:
                runtime.unregister(self.address + start)
            self._registered = []
        self.tensor = torch.empty(0, dtype=torch.uint8)
        try:
            self._map.close()
        except BufferError:
            log.debug("host memory still referenced; unmapped when the last view is dropped", label=self.label)
