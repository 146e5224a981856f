"""Start-up recovery: which records of a file left by an earlier process may be served again.

Two passes, both on the tier's I/O threads:

1. **Headers.** Each slot's header page is read and checked (magic, header checksum, committed
   flag, namespace and geometry, slot stamp, checksum kind). Records of another namespace or layout
   mean the file is not ours to serve: it is started afresh.
2. **Data.** The slots whose headers pass are read again whole, in runs of consecutive slots of up
   to one staging lane (``io_mb``, one ``O_DIRECT`` read per run), and each block's checksum is
   verified (xxh3 on the host, one call per block, in the I/O threads: xxhash releases the GIL).
   A record that fails is discarded and never promised; a run the kernel fails to read is
   discarded whole (``read_error``).

Of the records that pass, the newest copy of each key (highest generation) is kept. One log line
per recovery sums it up; :class:`~kvbm_core.storage.base.RecoveryReport` carries the counts by
reason to the caller.
"""

from __future__ import annotations

import mmap
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import structlog

from kvbm_core.storage import RecoveryReport, StagingLanes, TierIOError
from kvbm_tier_disk.blockfile import BlockFile
from kvbm_tier_disk.format import HEADER_BYTES, HEADER_DTYPE, RecordFault, RecordFormat

log = structlog.get_logger("kvbm.tier.disk")

READ_ERROR = "read_error"
SUPERSEDED = "superseded"
_SCAN_BATCH = 256
_LANE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Recovery:
    """The records to serve (``slots`` int64 ``[n]``, ``keys`` uint64 ``[n, 2]``), the next write
    generation, and the report."""

    slots: np.ndarray
    keys: np.ndarray
    next_generation: int
    report: RecoveryReport


@dataclass
class _Run:
    first: int
    count: int
    faults: np.ndarray | None = None
    keys: np.ndarray | None = None
    generations: np.ndarray | None = None
    error: str = ""


def recover(block_file: BlockFile, fmt: RecordFormat, num_slots: int, lanes: StagingLanes, io_threads: int,
            start_afresh: Callable[[], None]) -> Recovery:
    """Scan and verify ``block_file`` (module docstring); ``start_afresh`` drops a foreign file's content."""
    started = time.perf_counter()
    if block_file.fresh:
        return _nothing(block_file, started)
    with ThreadPoolExecutor(io_threads, thread_name_prefix="kvbm-disk-recover") as pool:
        scanned = list(pool.map(lambda s: _scan_headers(block_file, fmt, s, num_slots),
                                range(0, num_slots, _SCAN_BATCH)))
        headers = np.concatenate([h for h, _, _ in scanned])
        unreadable = np.concatenate([u for _, u, _ in scanned])
        h, faults = fmt.header_faults(headers, 0)
        sound = (faults != RecordFault.EMPTY) & (faults != RecordFault.TORN_HEADER) & ~unreadable
        next_generation = int(h["generation"][sound].max()) + 1 if sound.any() else 1
        counts: Counter[str] = Counter()
        foreign = int(((faults == RecordFault.FOREIGN) & ~unreadable).sum())
        if foreign:
            start_afresh()
            counts[RecordFault.FOREIGN.label] = foreign
            return _finish(block_file, started, np.zeros(0, np.int64), np.zeros((0, 2), np.uint64), 1, counts, 0,
                           recreated="records of another namespace or layout", first_error="")
        counts[READ_ERROR] += int(unreadable.sum())
        for fault in np.unique(faults[~unreadable]):
            if fault not in (RecordFault.OK, RecordFault.EMPTY):
                counts[RecordFault(int(fault)).label] += int((faults[~unreadable] == fault).sum())
        candidates = np.flatnonzero((faults == RecordFault.OK) & ~unreadable)
        runs = list(pool.map(lambda r: _verify_run(block_file, fmt, lanes, r), _runs(candidates, lanes.records)))
    first_error = next((r.error for r in runs if r.error), "") or next((e for _, _, e in scanned if e), "")
    slots, keys, generations = [], [], []
    for run in runs:
        if run.faults is None:
            counts[READ_ERROR] += run.count
            continue
        for fault in np.unique(run.faults):
            if fault != RecordFault.OK:
                counts[RecordFault(int(fault)).label] += int((run.faults == fault).sum())
        ok = np.flatnonzero(run.faults == RecordFault.OK)
        slots.append(run.first + ok)
        keys.append(run.keys[ok])
        generations.append(run.generations[ok])
    verified = sum(r.count for r in runs) * fmt.record_bytes
    if not slots:
        return _finish(block_file, started, np.zeros(0, np.int64), np.zeros((0, 2), np.uint64), next_generation,
                       counts, verified, first_error=first_error)
    kept_slots, kept_keys = _newest_per_key(np.concatenate(slots).astype(np.int64), np.concatenate(keys),
                                            np.concatenate(generations))
    counts[SUPERSEDED] += sum(len(s) for s in slots) - len(kept_slots)
    return _finish(block_file, started, kept_slots, kept_keys, next_generation, counts, verified,
                   first_error=first_error)


def _nothing(block_file: BlockFile, started: float) -> Recovery:
    report = RecoveryReport(path=block_file.path, recreated=block_file.recreated,
                            seconds=time.perf_counter() - started)
    return Recovery(np.zeros(0, np.int64), np.zeros((0, 2), np.uint64), 1, report)


def _finish(block_file: BlockFile, started: float, slots: np.ndarray, keys: np.ndarray, next_generation: int,
            counts: Counter[str], verified: int, *, first_error: str, recreated: str = "") -> Recovery:
    seconds = time.perf_counter() - started
    discarded = {reason: n for reason, n in sorted(counts.items()) if n}
    report = RecoveryReport(path=block_file.path, recovered=len(slots), discarded=discarded, recreated=recreated,
                            bytes_verified=verified, seconds=seconds)
    fields = dict(path=block_file.path, recovered=len(slots), discarded=discarded, verified_gb=round(verified / 1e9, 3),
                  seconds=round(seconds, 3))
    if first_error:
        fields["first_error"] = first_error
    if recreated:
        log.warning(f"disk tier recovery: the file holds {recreated}; its records are dropped and the file "
                    f"recreated", **fields)
    elif report.lost:
        log.warning("disk tier recovery: records that failed verification were discarded and will not be served",
                    **fields)
    else:
        log.info("disk tier recovery", **fields)
    return Recovery(slots, keys, next_generation, report)


def _scan_headers(block_file: BlockFile, fmt: RecordFormat, start: int,
                  num_slots: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Header pages of slots ``[start, start + _SCAN_BATCH)``; slots whose read failed are marked."""
    count = min(_SCAN_BATCH, num_slots - start)
    out = np.zeros((count, HEADER_DTYPE.itemsize), dtype=np.uint8)
    unreadable = np.zeros(count, dtype=bool)
    error = ""
    page = mmap.mmap(-1, HEADER_BYTES)  # page-aligned, as O_DIRECT needs
    try:
        view = memoryview(page)
        words = np.frombuffer(page, dtype=np.uint8)
        for i in range(count):
            try:
                got = block_file.pread_into(view, fmt.offset(start + i))
            except TierIOError as exc:
                unreadable[i], error = True, error or str(exc)
                continue
            if got == HEADER_BYTES:
                out[i] = words[: HEADER_DTYPE.itemsize]
        del words
        view.release()
    finally:
        page.close()
    return out, unreadable, error


def _runs(slots: np.ndarray, longest: int) -> list[_Run]:
    """Consecutive slots grouped into runs of at most ``longest``."""
    if slots.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    runs = []
    for group in np.split(slots, breaks):
        for first in range(0, len(group), longest):
            runs.append(_Run(int(group[first]), int(min(longest, len(group) - first))))
    return runs


def _verify_run(block_file: BlockFile, fmt: RecordFormat, lanes: StagingLanes, run: _Run) -> _Run:
    lane_index = lanes.acquire(timeout=_LANE_TIMEOUT_S)
    try:
        lane = lanes.lane(lane_index)
        records = lane[: run.count].numpy()
        try:
            got = block_file.pread_into(memoryview(records).cast("B"), fmt.offset(run.first))
        except TierIOError as exc:
            run.error = str(exc)
            return run
        if got < records.nbytes:
            records.reshape(-1)[got:] = 0
        h, faults = fmt.header_faults(records[:, :HEADER_BYTES], run.first)
        run.faults = fmt.data_faults(h, faults, lane[: run.count, HEADER_BYTES:HEADER_BYTES + fmt.bytes_per_block])
        run.keys, run.generations = h["key"].copy(), h["generation"].copy()
        return run
    finally:
        lanes.release(lane_index)


def _newest_per_key(slots: np.ndarray, keys: np.ndarray, generations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The record of each key with the highest generation; older copies are left to be overwritten."""
    order = np.lexsort((generations, keys[:, 1], keys[:, 0]))
    keys_sorted = keys[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = np.any(keys_sorted[1:] != keys_sorted[:-1], axis=1)
    keep = np.sort(order[last])
    return slots[keep], keys[keep]
