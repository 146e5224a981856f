"""Host tier start-up: how long the engine waits before it can serve, and until the whole tier is usable.

For each size (decimal GB, one rank) the ``cpu`` tier is built as a worker builds it in
``register_kv_caches`` (``build_tiers`` through the registry, then the :class:`TransferEngine`), at
the Llama-3-8B block shape. Reported per size and mode:

- ``serve_s``: from the start of ``build_tiers`` until the engine exists (what
  ``register_kv_caches`` waits for), with ``ready_slots`` usable at that moment;
- ``full_s``: from the same start until every slot is usable (``wait_ready``), and ``full_gbps``;
- ``checks``: a device -> host -> device round trip of the first slots right after start and of the
  last slots once grown, byte for byte (a timing of memory that does not work is worthless);
- ``probe``: latency of a one-block host -> device copy and its synchronisation, repeated while the
  tier grows and again once it is whole (p50/p99/max in ms): what growth costs an engine that
  serves meanwhile (CPU time, memory bandwidth, CUDA driver locks of ``cudaHostRegister``).

Modes: ``progressive`` (the default options: one 512 MiB segment at start, the rest in the
background) and ``all`` (``start_mb`` as large as the tier: everything before the engine starts, as
before). The reference, in the same run, is ``torch.empty(n, pin_memory=True)`` (on a machine without
CUDA: ``torch.empty(n)`` then ``fill_(0)``, which faults the pages in, as pinning does). Only one
allocation lives at a time. Target: ``serve_s`` <= 0.5 s at 8 and 64 GB.

Example (H200): ``python benchmarks/host_start_bench.py --sizes-gb 8,64 --out bench-out/host_start.json``.
On a CPU machine: ``python benchmarks/host_start_bench.py --sizes-gb 1,8 --modes progressive``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from kvbm_core.interfaces import TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.ops import Op, Route, TierAllocation, WorkerConfig
from kvbm_core.registry import default_registry
from kvbm_core.settings.model import KvbmSettings, TierSpec
from kvbm_core.worker import TransferEngine, build_tiers

LAYOUT = BlockLayout(num_layers=32, kv_factor=2, elems_per_block=8 * 32 * 128, dtype="bfloat16", tokens_per_block=32)
"""Llama-3-8B: 32 layers, 8 KV heads of 128, 32 tokens per block: 4 MiB per block."""

DEVICE_BLOCKS = 64
CHECK_BLOCKS = 8


def percentiles(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    ms = np.array(samples) * 1e3
    return {"n": len(samples), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def brief(row: dict, phase: str) -> str:
    probe = row.get("probe", {}).get(phase, {})
    return "/".join(f"{probe[k]:.2f}" for k in ("p50_ms", "p99_ms", "max_ms")) if probe.get("n") else "-"


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.ids = iter(range(1, 1 << 30))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def op(self, route: Route, src: np.ndarray, dst: np.ndarray) -> Op:
        n = len(src)
        return Op(next(self.ids), route, 0, np.asarray(src, np.int64), np.asarray(dst, np.int64),
                  np.zeros((n, 2), np.uint64))

    def round_trip(self, engine: TransferEngine, pool: torch.Tensor, slots: np.ndarray) -> bool:
        """Device blocks -> host ``slots`` -> other device blocks; whether the bytes came back."""
        n = len(slots)
        src, back = np.arange(n), np.arange(n, 2 * n)
        pool[:n].random_(0, 256)
        engine.start_stores([self.op(Route.D2H, src, slots)], None)
        stored = engine.drain(120)
        failed = engine.start_loads([self.op(Route.H2D, slots, back)], None)
        engine.drain(120)
        self.sync()
        return all(r.ok for r in stored) and not failed and torch.equal(pool[:n].cpu(), pool[n:2 * n].cpu())

    def probe(self, engine: TransferEngine, pool: torch.Tensor, host, until_whole: bool) -> list[float]:
        """One-block loads from host slot 0, timed to completion: while the tier grows, or a fixed count."""
        samples: list[float] = []
        end = time.monotonic() + self.args.probe_s
        while time.monotonic() < end:
            if until_whole and host.ready_slots == host.context.num_slots:
                break
            t0 = time.perf_counter()
            failed = engine.start_loads([self.op(Route.H2D, np.array([0]), np.array([2 * DEVICE_BLOCKS - 1]))], None)
            self.sync()
            samples.append(time.perf_counter() - t0)
            if failed:
                raise RuntimeError(f"probe load failed: {failed}")
            engine.drain(10)
            time.sleep(self.args.probe_gap_s)
        return samples

    def tier_start(self, size_gb: float, mode: str) -> dict:
        args = self.args
        num_slots = int(size_gb * 1e9) // LAYOUT.bytes_per_block
        options: dict = {}
        if mode == "all":
            options["start_mb"] = num_slots * LAYOUT.bytes_per_block / (1 << 20)
        if args.grow_threads:
            options["grow_threads"] = args.grow_threads
        spec = TierSpec(kind="cpu", num_blocks=num_slots, options=options)
        config = WorkerConfig(KvbmSettings(tiers=[spec]), (TierAllocation("cpu", TierLevel.HOST, num_slots),),
                              os.urandom(16), 1)
        pool = torch.zeros(2 * DEVICE_BLOCKS, LAYOUT.bytes_per_block, dtype=torch.uint8, device=self.device)
        pool_4d = pool.view(2 * DEVICE_BLOCKS, LAYOUT.num_layers, LAYOUT.kv_factor, -1)
        self.sync()
        t0 = time.perf_counter()
        tiers = build_tiers(config, LAYOUT, 0, self.device, default_registry())
        engine = TransferEngine(pool_4d, LAYOUT, tiers, rank=0)
        serve_s = time.perf_counter() - t0
        host = tiers[TierLevel.HOST]
        ready_at_start = host.ready_slots
        whole: dict = {}
        watcher = threading.Thread(target=lambda: whole.update(
            ready=host.wait_ready(num_slots, timeout=args.timeout_s), at=time.perf_counter()))
        watcher.start()
        row: dict = {"size_gb": size_gb, "mode": mode, "num_slots": num_slots, "serve_s": serve_s,
                     "ready_slots_at_start": ready_at_start, "segment_slots": host.segment_slots,
                     "pinned": host.pinned, "start": asdict(host.allocation) | {"total_s": host.allocation.total_s}}
        try:
            first = np.arange(min(CHECK_BLOCKS, ready_at_start))
            checks = {"first_slots_right_after_start": self.round_trip(engine, pool, first)}
            during = self.probe(engine, pool, host, until_whole=True) if args.probe_s > 0 else []
            watcher.join()
            ready = whole["ready"]
            full_s = whole["at"] - t0
            after = self.probe(engine, pool, host, until_whole=False) if args.probe_s > 0 else []
            last = np.arange(num_slots - min(CHECK_BLOCKS, num_slots), num_slots)
            checks["last_slots_once_grown"] = ready == num_slots and self.round_trip(engine, pool, last)
            row |= {"full_s": full_s if ready == num_slots else None, "ready_slots_at_end": ready,
                    "full_gbps": num_slots * LAYOUT.bytes_per_block / full_s / 1e9 if ready == num_slots else None,
                    "growth_error": getattr(host, "growth_error", None), "checks": checks,
                    "probe": {"while_growing": percentiles(during), "once_whole": percentiles(after)}}
        finally:
            engine.close()
            for tier in tiers.values():
                tier.close()
        return row

    def reference(self, size_gb: float) -> dict:
        nbytes = int(size_gb * 1e9)
        pin = self.device.type == "cuda"
        t0 = time.perf_counter()
        ref = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        if not pin:
            ref.fill_(0)
        seconds = time.perf_counter() - t0
        del ref
        return {"size_gb": size_gb, "mode": "torch.empty(pin_memory=True)" if pin else "torch.empty+fill_",
                "serve_s": seconds, "full_s": seconds, "full_gbps": nbytes / seconds / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-gb", default="8,64", help="comma-separated tier sizes, decimal GB")
    p.add_argument("--modes", default="progressive,all,reference", help="progressive, all, reference")
    p.add_argument("--grow-threads", type=int, default=0, help="the tier's grow_threads option (0: its default)")
    p.add_argument("--probe-s", type=float, default=5.0, help="longest probe while growing, and probe once whole")
    p.add_argument("--probe-gap-s", type=float, default=0.002, help="pause between probe loads")
    p.add_argument("--timeout-s", type=float, default=300.0, help="longest wait for the tier to be whole")
    p.add_argument("--cpu", action="store_true", help="use the CPU even where CUDA exists")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    run = Run(args)
    modes = args.modes.split(",")
    rows, errors = [], []
    print(f"device {run.device}, torch {torch.__version__}, python {platform.python_version()}", flush=True)
    for size in (float(s) for s in args.sizes_gb.split(",")):
        for mode in modes:
            try:
                row = run.reference(size) if mode == "reference" else run.tier_start(size, mode)
            except Exception as exc:  # one size failing must not lose the others
                traceback.print_exc()
                errors.append({"size_gb": size, "mode": mode, "error": f"{type(exc).__name__}: {exc}"})
                continue
            rows.append(row)
            print(f"{size:6.1f} GB {mode:30} serve {row['serve_s']:7.3f} s  full "
                  f"{row['full_s'] if row.get('full_s') is not None else float('nan'):7.3f} s  "
                  f"ready at start {row.get('ready_slots_at_start', '-')}/{row.get('num_slots', '-')}  "
                  f"checks {'ok' if all(row.get('checks', {}).values()) else row.get('checks')}  "
                  f"probe p50/p99/max ms: {brief(row, 'while_growing')} growing, {brief(row, 'once_whole')} whole",
                  flush=True)
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(run.device),
        "gpu": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else None,
        "cpus": os.cpu_count(),
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
        "torch": torch.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "median_serve_s": {m: statistics.median(r["serve_s"] for r in rows if r["mode"] == m)
                           for m in {r["mode"] for r in rows}},
        "rows": rows,
        "errors": errors,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
