"""Start-up recovery of the disk tier: seconds per GB of a full tier file.

Creates a tier file of ``--gb`` GB for blocks of the Llama-3-8B shape (4 MiB, 32 tokens per block)
and opens it again ``--repeat`` times while it holds no record (the cost of opening an existing
file: staging memory, header scan); then fills every slot and opens it ``--repeat`` times more (each
open is a restart that recovers every record). Recovery per GB is the difference of the medians
over the file size; ``raw_read_s_per_gb`` is a plain parallel O_DIRECT read of the same file (8
threads, 16 MiB reads: the tier's defaults) for reference. Page cache is dropped before each open where the process may (root); the tier reads
with O_DIRECT anyway.

Example: ``python plugins/tier_disk/benchmarks/recovery_bench.py --dir "$NVME_DIR" --gb 8``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kvbm_core.interfaces import TierContext
from kvbm_core.layout import BlockLayout
from kvbm_core.settings.model import DiskSettings, KvbmSettings, TierSpec
from kvbm_tier_disk import LocalDiskTier

LAYOUT = BlockLayout(num_layers=32, kv_factor=2, elems_per_block=8 * 32 * 128, dtype="bfloat16", tokens_per_block=32)


def _context(directory: str, slots: int, namespace: bytes) -> TierContext:
    spec = TierSpec(kind="disk", num_blocks=slots)
    settings = KvbmSettings(disk=DiskSettings(directory=directory))
    return TierContext(spec=spec, layout=LAYOUT, num_slots=slots, rank=0, world_size=1, namespace=namespace,
                       device=None, settings=settings)


def _drop_caches() -> None:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        pass


def _fill(tier: LocalDiskTier, slots: int) -> None:
    rows = torch.randint(0, 256, (tier.io_records, tier.bytes_per_block), dtype=torch.uint8)
    lane = tier.lanes.acquire(10.0)
    try:
        for first in range(0, slots, tier.io_records):
            k = min(tier.io_records, slots - first)
            keys = np.arange(2 * first, 2 * (first + k), dtype=np.uint64).reshape(k, 2) + np.uint64(1)
            rows[:, :16] = torch.from_numpy(keys[:1].view(np.uint8).reshape(-1).copy())  # distinct bytes per run
            tier.write_rows(rows[:k], first, keys, tier.lanes.lane(lane))
    finally:
        tier.lanes.release(lane)


def _timed_open(directory: str, slots: int, namespace: bytes) -> tuple[float, int]:
    _drop_caches()
    start = time.perf_counter()
    tier = LocalDiskTier(_context(directory, slots, namespace))
    seconds = time.perf_counter() - start
    recovered = len(tier.recovered()[0])
    tier.close()
    return seconds, recovered


def _raw_read(path: str, chunk: int, threads: int) -> float:
    """Seconds to read the whole file with ``threads`` parallel O_DIRECT reads of ``chunk`` bytes."""
    _drop_caches()
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    local = threading.local()

    def read(offset: int) -> None:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = mmap.mmap(-1, chunk)
        os.preadv(fd, [memoryview(buf)[: min(chunk, size - offset)]], offset)

    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, range(0, size, chunk)))
        return time.perf_counter() - start
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="directory for the tier file (default: a new temporary one)")
    parser.add_argument("--gb", type=float, default=2.0, help="tier file size in GB (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="kvbm-recovery-bench-")
    slots = max(1, int(args.gb * 1e9 // LocalDiskTier.bytes_per_slot(LAYOUT)))
    namespace = os.urandom(16)
    try:
        tier = LocalDiskTier(_context(directory, slots, namespace))
        path, size, mode = tier.path, os.path.getsize(tier.path), tier.mode
        tier.close()
        empty = [_timed_open(directory, slots, namespace)[0] for _ in range(args.repeat)]
        tier = LocalDiskTier(_context(directory, slots, namespace))
        start = time.perf_counter()
        _fill(tier, slots)
        fill_s = time.perf_counter() - start
        tier.close()
        runs = [_timed_open(directory, slots, namespace) for _ in range(args.repeat)]
        raw_s = statistics.median(_raw_read(path, 16 << 20, 8) for _ in range(args.repeat))
        os.unlink(path)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    full_s, empty_s = statistics.median(s for s, _ in runs), statistics.median(empty)
    print(json.dumps({
        "file_gb": size / 1e9, "slots": slots, "record_bytes": LocalDiskTier.bytes_per_slot(LAYOUT), "io": mode,
        "fill_gbps": size / fill_s / 1e9, "recovered": runs[0][1], "open_full_s": [round(s, 3) for s, _ in runs],
        "open_empty_s": [round(s, 3) for s in empty], "recovery_s_per_gb": round((full_s - empty_s) / (size / 1e9), 4),
        "raw_read_s_per_gb": round(raw_s / (size / 1e9), 4),
        "machine": platform.node(), "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
