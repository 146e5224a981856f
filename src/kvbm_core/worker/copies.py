"""Batched block copies between row spaces (KV pool, host pool, staging lanes), by row index.

A row space is a ``[rows, row_bytes]`` uint8 tensor whose rows are contiguous; rows may be further
apart than ``row_bytes`` (staging lanes interleave 4096-byte headers), and a space may be cut into
segments a copy must not cross (separately registered pinned memory). :func:`coalesce` turns paired
index arrays into maximal runs that are consecutive on both sides, with numpy, no per-block loop.

:class:`BlockCopier` moves the runs:

- ``batch``: one ``cuMemcpyBatchAsync`` driver call for all runs of an operation (CUDA 12.8+),
  called through ctypes; checked once by a self-test copy at start, else ``runs`` is used.
- ``runs``: one ``copy_(non_blocking=True)`` per run (few runs when slots are consecutive).
- ``copy_by_layer`` (batch only): the same copy, one layer of every block at a time, so that an
  engine can start on layer 0 while later layers are still copied.
- on CPU: one ``copy_`` per run, or a gather and a scatter when runs are many.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

import numpy as np
import structlog
import torch

log = structlog.get_logger("kvbm.worker.copies")

STRATEGIES = ("auto", "batch", "runs")
_CPU_INDEX_THRESHOLD = 16
_BATCH_CHUNK = 4096
_SRC_ACCESS_ORDER_STREAM = 1


def coalesce(src: np.ndarray, dst: np.ndarray, src_segment: int = 0, dst_segment: int = 0,
             max_len: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs ``(src_start, dst_start, length)`` where both indices advance by one.

    A run never crosses a multiple of ``*_segment`` (1 makes every row its own run; 0: no limit)
    and is at most ``max_len`` long (0: no limit).
    """
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    n = len(src)
    if n == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    brk = np.ones(n, dtype=bool)
    brk[1:] = (np.diff(src) != 1) | (np.diff(dst) != 1)
    for idx, seg in ((src, src_segment), (dst, dst_segment)):
        if seg:
            brk[1:] |= (idx[1:] // seg) != (idx[:-1] // seg)
    starts = np.flatnonzero(brk)
    lengths = np.diff(np.append(starts, n))
    if max_len and lengths.max() > max_len:
        pieces = -(-lengths // max_len)
        run_of = np.repeat(np.arange(len(starts)), pieces)
        within = np.arange(len(run_of)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        offsets = starts[run_of] + within * max_len
        lengths = np.minimum(max_len, lengths[run_of] - within * max_len)
        starts = offsets
    return src[starts], dst[starts], lengths


def row_segment(rows: torch.Tensor, segment: int) -> int:
    """The segment to coalesce ``rows`` with: 1 when its rows are not back to back."""
    return segment if rows.stride(0) == rows.shape[1] else 1


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    _fields_ = [
        ("srcAccessOrder", ctypes.c_int),
        ("srcLocHint", _MemLocation),
        ("dstLocHint", _MemLocation),
        ("flags", ctypes.c_uint),
    ]


class _BatchMemcpy:
    """``cuMemcpyBatchAsync`` of the driver: the CUDA 13 ``_v2`` ABI, or 12.8's with ``failIdx``."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        common = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                  ctypes.POINTER(_MemcpyAttributes), ctypes.POINTER(ctypes.c_size_t), ctypes.c_size_t]
        if hasattr(lib, "cuMemcpyBatchAsync_v2"):
            self._fn = lib.cuMemcpyBatchAsync_v2
            self._fn.argtypes = [*common, ctypes.c_void_p]
            self._fail_idx = False
        else:
            self._fn = lib.cuMemcpyBatchAsync
            self._fn.argtypes = [*common, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p]
            self._fail_idx = True
        self._fn.restype = ctypes.c_int
        self._attrs = _MemcpyAttributes(_SRC_ACCESS_ORDER_STREAM)

    def __call__(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: int) -> None:
        for a in range(0, len(sizes), _BATCH_CHUNK):
            d, s, n = (np.ascontiguousarray(x[a:a + _BATCH_CHUNK], dtype=np.uint64) for x in (dsts, srcs, sizes))
            attr_index = ctypes.c_size_t(0)
            args = [d.ctypes.data, s.ctypes.data, n.ctypes.data, len(n), ctypes.byref(self._attrs),
                    ctypes.byref(attr_index), 1]
            if self._fail_idx:
                args.append(ctypes.byref(ctypes.c_size_t(0)))
            rc = self._fn(*args, ctypes.c_void_p(stream))
            if rc != 0:
                raise RuntimeError(f"cuMemcpyBatchAsync failed with CUDA error {rc}")


class BlockCopier:
    """Copies rows between row spaces; on CUDA, enqueued on the caller's stream."""

    _batch: _BatchMemcpy | None = None
    _batch_checked = threading.Lock()

    def __init__(self, device: torch.device, strategy: str = "auto") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"copy strategy {strategy!r} (accepted: {', '.join(STRATEGIES)})")
        self.device = device
        self.strategy = "cpu" if device.type != "cuda" else strategy
        if self.strategy in ("auto", "batch"):
            self.strategy = "batch" if self._batch_ready(device) else "runs"

    @classmethod
    def _batch_ready(cls, device: torch.device) -> bool:
        with cls._batch_checked:
            if cls._batch is not None:
                return True
            try:
                batch = _BatchMemcpy()
                _self_test(batch, device)
            except Exception as exc:  # missing symbol, old driver, or a wrong result: use plain copies
                log.warning("batched copies unavailable: one copy per run", error=str(exc))
                return False
            cls._batch = batch
            return True

    def copy(self, dst: torch.Tensor, dst_idx: np.ndarray, src: torch.Tensor, src_idx: np.ndarray, *,
             dst_segment: int = 0, src_segment: int = 0, stream: torch.cuda.Stream | None = None) -> None:
        """``dst[dst_idx[i]] = src[src_idx[i]]`` for every ``i`` (2-D uint8 row spaces)."""
        s0, d0, length = coalesce(src_idx, dst_idx, row_segment(src, src_segment), row_segment(dst, dst_segment))
        if len(length) == 0:
            return
        if self.strategy == "cpu":
            self._copy_cpu(dst, dst_idx, src, src_idx, s0, d0, length)
        elif self.strategy == "batch" and len(length) > 1:
            assert stream is not None and self._batch is not None
            row = src.shape[1]
            self._batch(dst.data_ptr() + d0 * dst.stride(0), src.data_ptr() + s0 * src.stride(0),
                        length * row, stream.cuda_stream)
        else:
            with torch.cuda.stream(stream):
                for s, d, n in zip(s0.tolist(), d0.tolist(), length.tolist()):
                    dst[d:d + n].copy_(src[s:s + n], non_blocking=True)

    def copy_by_layer(self, dst: torch.Tensor, dst_idx: np.ndarray, src: torch.Tensor, src_idx: np.ndarray,
                      num_layers: int, stream: torch.cuda.Stream, after_layer: Callable[[int], None]) -> None:
        """``copy``, one layer at a time (batch strategy only): rows are block-major ``[layers, ...]``,
        so layer ``l`` of every row is the ``l``-th of ``num_layers`` equal slices. ``after_layer(l)``
        runs once layer ``l``'s copies are enqueued (to record an event the engine can wait on)."""
        assert self.strategy == "batch" and self._batch is not None
        layer_bytes = src.shape[1] // num_layers
        dst_ptrs = dst.data_ptr() + np.asarray(dst_idx, np.int64) * dst.stride(0)
        src_ptrs = src.data_ptr() + np.asarray(src_idx, np.int64) * src.stride(0)
        sizes = np.full(len(src_ptrs), layer_bytes, np.int64)
        for layer in range(num_layers):
            offset = layer * layer_bytes
            self._batch(dst_ptrs + offset, src_ptrs + offset, sizes, stream.cuda_stream)
            after_layer(layer)

    @staticmethod
    def _copy_cpu(dst: torch.Tensor, dst_idx: np.ndarray, src: torch.Tensor, src_idx: np.ndarray,
                  s0: np.ndarray, d0: np.ndarray, length: np.ndarray) -> None:
        if len(length) > _CPU_INDEX_THRESHOLD:
            dst.index_copy_(0, torch.from_numpy(np.asarray(dst_idx, np.int64)),
                            src.index_select(0, torch.from_numpy(np.asarray(src_idx, np.int64))))
            return
        for s, d, n in zip(s0.tolist(), d0.tolist(), length.tolist()):
            dst[d:d + n].copy_(src[s:s + n])


def _self_test(batch: _BatchMemcpy, device: torch.device) -> None:
    """Three scattered runs host -> device -> host through the batch call; bytes must match."""
    torch.cuda.set_device(device)
    host = torch.arange(4096, dtype=torch.int32).view(torch.uint8).view(16, 1024).pin_memory()
    dev = torch.zeros(16, 1024, dtype=torch.uint8, device=device)
    back = torch.zeros(16, 1024, dtype=torch.uint8).pin_memory()
    stream = torch.cuda.Stream(device)
    src_rows, dst_rows, n = np.array([0, 5, 9]), np.array([3, 11, 1]), np.array([2, 3, 1])
    batch(dev.data_ptr() + dst_rows * 1024, host.data_ptr() + src_rows * 1024, n * 1024, stream.cuda_stream)
    batch(back.data_ptr() + src_rows * 1024, dev.data_ptr() + dst_rows * 1024, n * 1024, stream.cuda_stream)
    stream.synchronize()
    for s, d, k in zip(src_rows, dst_rows, n):
        if not (torch.equal(dev[d:d + k].cpu(), host[s:s + k]) and torch.equal(back[s:s + k], host[s:s + k])):
            raise RuntimeError("cuMemcpyBatchAsync self-test copied the wrong bytes")
