"""Transfer benchmark: the engine's copies against raw copies of the same bytes, in one run.

Sections (each row: engine GB/s, reference GB/s, ratio, and the target):

- ``host alloc``: the host tier's allocator vs ``torch.empty(n, pin_memory=True)`` of the same size.
- ``offload`` / ``onboard``: D2H / H2D of N blocks of TRT-LLM's pool ``[blocks, layers, 2,
  heads*tokens*head_dim]`` (Qwen3-0.6B and Llama-3-8B shapes) through :class:`TransferEngine`, with
  scattered or consecutive block ids and each copy strategy, vs one raw copy of the same bytes between
  the same pinned host pool and the device (target >= 0.9).
- ``offload+onboard``: both directions at once vs one raw copy one way (target >= 1.4).
- ``disk write`` / ``disk read``: host -> disk and disk -> host (staging) through the disk tier vs a raw
  sequential O_DIRECT write/read of the same bytes in the same directory (target >= 0.85);
  ``gds write`` / ``gds read`` likewise through the GDS tier, in whatever mode the machine allows.

``--tiny`` runs everything at toy sizes (on CPU too) in seconds. Results go to ``--out`` as JSON.
Example (H200): ``python benchmarks/transfer_bench.py --out bench-out/transfer.json``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvbm_core.interfaces import TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.ops import Op, Route, TierAllocation, WorkerConfig
from kvbm_core.registry import default_registry
from kvbm_core.settings.model import DiskSettings, KvbmSettings, TierSpec
from kvbm_core.storage import HostMemory
from kvbm_core.worker import TransferEngine, build_tiers

MODELS = {  # layers, kv heads, head_dim (bf16, 32 tokens per block)
    "qwen3-0.6b": (28, 8, 128),
    "llama-3-8b": (32, 8, 128),
}


@dataclass
class Row:
    section: str
    model: str
    blocks: int
    variant: str
    gbytes: float
    engine_gbps: float
    reference_gbps: float
    ratio: float
    target: float
    detail: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "ok" if self.ratio >= self.target else "below"


def layout_for(model: str, tokens: int, tiny: bool) -> BlockLayout:
    if tiny:
        return BlockLayout(2, 2, 2 * tokens * 16, "bfloat16", tokens)
    layers, heads, head_dim = MODELS[model]
    return BlockLayout(layers, 2, heads * tokens * head_dim, "bfloat16", tokens)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``fn`` (which must leave no GPU work pending when it returns)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def op(op_id: int, route: Route, src: np.ndarray, dst: np.ndarray) -> Op:
    keys = np.stack([np.asarray(src, np.uint64) + np.uint64(op_id << 32), np.asarray(dst, np.uint64)], axis=1)
    return Op(op_id, route, op_id, np.asarray(src, np.int64), np.asarray(dst, np.int64), keys)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.rows: list[Row] = []
        self.errors: list[dict] = []
        self._ids = iter(range(1, 1 << 30))

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"{row.section:16} {row.model:11} {row.blocks:6d} {row.variant:18} {row.gbytes:8.3f} GB "
              f"{row.engine_gbps:8.2f} {row.reference_gbps:8.2f} {row.ratio:6.2f} (>= {row.target:.2f} {row.verdict})",
              flush=True)

    def guarded(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # one section failing must not lose the others
            traceback.print_exc()
            self.errors.append({"section": name, "error": f"{type(exc).__name__}: {exc}"})

    # ------------------------------------------------------------------------ host alloc
    def host_alloc(self) -> None:
        nbytes = int(self.args.alloc_gb * (1 << 30))
        t0 = time.perf_counter()
        mem = HostMemory(nbytes, device=self.device, label="bench")
        ours = time.perf_counter() - t0
        detail = asdict(mem.stats)
        mem.close()
        del mem
        pin = self.device.type == "cuda"
        t0 = time.perf_counter()
        ref = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        if not pin:
            ref.fill_(0)  # fault the pages in, as the pinned allocation does
        theirs = time.perf_counter() - t0
        del ref
        gb = nbytes / 1e9
        self.add(Row("host alloc", "-", 0, "pinned" if pin else "pageable", gb, gb / ours, gb / theirs,
                     theirs / ours, 1.0, detail))

    # ------------------------------------------------------------------------ host <-> GPU
    def rig(self, layout: BlockLayout, blocks: int, kinds: tuple[str, ...], disk_blocks: int = 0):
        specs, allocs = [], []
        opts = {"io_threads": self.args.io_threads, "io_mb": self.args.io_mb}
        if "cpu" in kinds:
            specs.append(TierSpec(kind="cpu", num_blocks=blocks))
            allocs.append(TierAllocation("cpu", TierLevel.HOST, blocks))
        for kind in ("disk", "gds"):
            if kind in kinds:
                specs.append(TierSpec(kind=kind, num_blocks=disk_blocks, options=opts))
                allocs.append(TierAllocation(kind, TierLevel.DISK, disk_blocks))
        settings = KvbmSettings(tiers=specs, disk=DiskSettings(directory=self.args.disk_dir))
        config = WorkerConfig(settings, tuple(allocs), os.urandom(16), 1)
        tiers = build_tiers(config, layout, 0, self.device, default_registry())
        pool = torch.empty(blocks, layout.num_layers, layout.kv_factor, layout.elems_per_block,
                           dtype=torch.bfloat16, device=self.device)
        pool.view(blocks, -1).view(torch.uint8).random_(0, 256) if self.device.type == "cpu" else pool.normal_()
        return tiers, pool

    def host_gpu(self, model: str) -> None:
        args = self.args
        sizes = [int(s) for s in args.blocks.split(",")]
        layout = layout_for(model, args.tokens_per_block, args.tiny)
        n_max = max(sizes)
        tiers, pool = self.rig(layout, n_max, ("cpu",))
        host = tiers[TierLevel.HOST]
        pool_bytes = pool.view(n_max, -1).view(torch.uint8)
        strategies = ["batch", "runs"] if self.device.type == "cuda" else ["auto"]
        engines = {s: TransferEngine(pool, layout, tiers, rank=0, copy_strategy=s) for s in strategies}
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        rng = np.random.default_rng(0)
        bpb = layout.bytes_per_block
        try:
            for n in sizes:
                gb = n * bpb / 1e9

                def raw_d2h(n=n) -> None:
                    with torch.cuda.stream(stream) if stream is not None else _null():
                        for a, b in segments(host, n):
                            host.slots[a:b].copy_(pool_bytes[a:b], non_blocking=True)

                def raw_h2d(n=n) -> None:
                    with torch.cuda.stream(stream) if stream is not None else _null():
                        for a, b in segments(host, n):
                            pool_bytes[a:b].copy_(host.slots[a:b], non_blocking=True)

                ref_d2h = gb / timed(raw_d2h, self.device, args.repeats)
                ref_h2d = gb / timed(raw_h2d, self.device, args.repeats)
                patterns = {"scattered": (rng.permutation(n_max)[:n], rng.permutation(n_max)[:n]),
                            "consecutive": (np.arange(n), np.arange(n))}
                for strategy, engine in engines.items():
                    for pattern, (dev_ids, slots) in patterns.items():
                        variant = f"{pattern}/{engine.copier.strategy}"
                        for section, route, ref in (("offload", Route.D2H, ref_d2h), ("onboard", Route.H2D, ref_h2d)):
                            src, dst = (dev_ids, slots) if route == Route.D2H else (slots, dev_ids)
                            seconds, gpu = self.run_engine(engine, [op(next(self._ids), route, src, dst)])
                            self.add(Row(section, model, n, variant, gb, gb / seconds, ref, gb / seconds / ref, 0.9,
                                         {"gpu_seconds": gpu, "wall_seconds": seconds}))
                    if n >= 2:  # both directions at once, on disjoint halves
                        half = n // 2
                        dev_ids, slots = patterns["scattered"]
                        both = [op(next(self._ids), Route.D2H, dev_ids[:half], slots[:half]),
                                op(next(self._ids), Route.H2D, slots[half:2 * half], dev_ids[half:2 * half])]
                        seconds, _ = self.run_engine(engine, both)
                        gb2 = 2 * half * bpb / 1e9
                        self.add(Row("offload+onboard", model, 2 * half, f"scattered/{engine.copier.strategy}", gb2,
                                     gb2 / seconds, min(ref_d2h, ref_h2d), gb2 / seconds / min(ref_d2h, ref_h2d), 1.4))
                for engine in engines.values():
                    self.check_bytes(engine, pool_bytes, host.slots, n_max)
        finally:
            for engine in engines.values():
                engine.close()
            for tier in tiers.values():
                tier.close()
            del pool, pool_bytes

    def run_engine(self, engine: TransferEngine, ops: list[Op]) -> tuple[float, float]:
        """Median wall seconds from submitting ``ops`` to their completion, and the engine's own figure."""
        def once() -> list:
            stores = [o for o in ops if o.route == Route.D2H]
            loads = [o for o in ops if o.route == Route.H2D]
            engine.start_stores(stores, None)
            engine.start_loads(loads, None, blocking=False)
            results = engine.drain(600)
            bad = [r for r in results if not r.ok]
            if bad or len(results) != len(ops):
                raise RuntimeError(f"engine transfer failed: {bad or results}")
            return results

        once()
        walls, engine_s = [], []
        for _ in range(self.args.repeats):
            fresh = [Op(next(self._ids), o.route, o.request_id, o.src, o.dst, o.keys) for o in ops]
            ops[:] = fresh
            sync(self.device)
            t0 = time.perf_counter()
            results = once()
            walls.append(time.perf_counter() - t0)
            engine_s.append(max(r.seconds for r in results))
        return statistics.median(walls), statistics.median(engine_s)

    def check_bytes(self, engine: TransferEngine, pool_bytes: torch.Tensor, slots: torch.Tensor, n: int) -> None:
        """A scattered round trip device -> host -> device, byte for byte (timings are worthless otherwise)."""
        k = min(n // 2, 64)
        if k == 0:
            return
        rng = np.random.default_rng(1)
        blocks = rng.permutation(n)
        src, back = blocks[:k], blocks[k:2 * k]
        dst = rng.permutation(n)[:k]
        expected = pool_bytes[torch.from_numpy(src).to(pool_bytes.device)].cpu()
        engine.start_stores([op(next(self._ids), Route.D2H, src, dst)], None)
        engine.drain(60)
        if not torch.equal(slots[torch.from_numpy(dst)].cpu(), expected):
            raise RuntimeError(f"offloaded bytes differ from the device blocks ({engine.copier.strategy})")
        engine.start_loads([op(next(self._ids), Route.H2D, dst, back)], None, blocking=True)
        engine.drain(60)
        if not torch.equal(pool_bytes[torch.from_numpy(back).to(pool_bytes.device)].cpu(), expected):
            raise RuntimeError(f"onboarded bytes differ from the host slots ({engine.copier.strategy})")

    # ------------------------------------------------------------------------------- disk
    def disk(self, model: str, kind: str) -> None:
        args = self.args
        layout = layout_for(model, args.tokens_per_block, args.tiny)
        n = args.disk_blocks
        tiers, pool = self.rig(layout, n, ("cpu", kind), disk_blocks=n)
        tier = tiers[TierLevel.DISK]
        host = tiers[TierLevel.HOST]
        pool_bytes = pool.view(n, -1).view(torch.uint8)
        for a, b in segments(host, n):
            host.slots[a:b].copy_(pool_bytes[a:b])
        engine = TransferEngine(pool, layout, tiers, rank=0)
        gb = n * layout.bytes_per_block / 1e9
        raw_w, raw_r = raw_odirect(args.disk_dir, n * tier.record_bytes, args.raw_mb << 20)
        try:
            ids = np.arange(n)
            write_route, write_src = (Route.D2DISK, ids) if kind == "gds" else (Route.H2DISK, ids)
            t0 = time.perf_counter()
            w = op(next(self._ids), write_route, write_src, ids)
            if write_route == Route.D2DISK:
                engine.start_stores([w], None)
            else:
                engine.start_background([w])
            (res,) = engine.drain(1200)
            seconds = time.perf_counter() - t0
            if not res.ok:
                raise RuntimeError(f"{kind} write failed: {res.error}")
            mode = tier.mode
            self.add(Row(f"{kind} write", model, n, f"{mode}/{'device' if write_route == Route.D2DISK else 'host'}",
                         gb, gb / seconds, raw_w, gb / seconds / raw_w, 0.85, {"record_bytes": tier.record_bytes}))
            # A disk block is read (and verified) into a host slot before it is promised: DISK2H.
            expected = pool_bytes.cpu()
            host.slots[:n].zero_()
            t0 = time.perf_counter()
            res = engine.run_now(Op(next(self._ids), Route.DISK2H, 0, ids, ids, w.keys), timeout=1200)
            seconds = time.perf_counter() - t0
            if not res.ok:
                raise RuntimeError(f"{kind} read failed: {res.error}")
            if not torch.equal(host.slots[:n].cpu(), expected):
                raise RuntimeError(f"{kind} read returned different bytes")
            self.add(Row(f"{kind} read", model, n, mode, gb, gb / seconds, raw_r, gb / seconds / raw_r, 0.85))
        finally:
            engine.close()
            for t in tiers.values():
                t.close()
            os.unlink(tier.path)


def segments(host, n: int) -> list[tuple[int, int]]:
    """The raw reference copies: one contiguous copy per pinned segment of the host pool (CUDA sees
    each segment as its own pinned allocation, so one copy cannot span two; segments are ~512 MiB)."""
    step = max(1, host.segment_slots)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def raw_odirect(directory: str, nbytes: int, chunk: int) -> tuple[float, float]:
    """GB/s of a sequential O_DIRECT write, then read, of ``nbytes`` in ``chunk``-byte requests."""
    chunk = max(4096, min(chunk, nbytes) // 4096 * 4096)
    buf = mmap.mmap(-1, chunk)
    buf.write(os.urandom(min(chunk, 1 << 20)) * (chunk // min(chunk, 1 << 20)))
    fd, path = tempfile.mkstemp(dir=directory, prefix=".kvbm-raw-")
    os.close(fd)
    flags = os.O_RDWR | getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        fd = os.open(path, os.O_RDWR)
    try:
        total = -(-nbytes // chunk) * chunk
        t0 = time.perf_counter()
        for off in range(0, total, chunk):
            os.pwrite(fd, buf, off)
        os.fsync(fd)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for off in range(0, total, chunk):
            os.preadv(fd, [buf], off)
        read_s = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
        buf.close()
    return total / 1e9 / write_s, total / 1e9 / read_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy sizes, seconds on a CPU machine")
    p.add_argument("--cpu", action="store_true", help="use the CPU even where CUDA exists")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--blocks", default="1024,2048,4096,8192", help="block counts for host <-> GPU")
    p.add_argument("--tokens-per-block", type=int, default=32)
    p.add_argument("--disk-blocks", type=int, default=512, help="blocks written and read through each disk tier")
    p.add_argument("--disk-dir", default=tempfile.gettempdir())
    p.add_argument("--io-threads", type=int, default=8)
    p.add_argument("--io-mb", type=int, default=16)
    p.add_argument("--raw-mb", type=int, default=64, help="request size of the raw O_DIRECT reference")
    p.add_argument("--alloc-gb", type=float, default=8.0, help="host allocation size (GiB)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sections", default="alloc,host,disk,gds")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.tiny:
        args.blocks, args.disk_blocks, args.alloc_gb, args.repeats = "16,64", 32, 0.0625, 2
        args.io_mb, args.raw_mb = 1, 1
    sections = set(args.sections.split(","))
    bench = Bench(args)
    print(f"device {bench.device}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"{'section':16} {'model':11} {'blocks':>6} {'variant':18} {'size':>11} {'engine':>8} {'ref':>8} {'ratio':>6}")
    if "alloc" in sections:
        bench.guarded("host alloc", bench.host_alloc)
    for model in args.models.split(","):
        if "host" in sections:
            bench.guarded(f"host {model}", lambda m=model: bench.host_gpu(m))
        for kind in ("disk", "gds"):
            if kind in sections:
                bench.guarded(f"{kind} {model}", lambda m=model, k=kind: bench.disk(m, k))
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": str(bench.device),
        "gpu": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else None,
        "torch": torch.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": [asdict(r) | {"verdict": r.verdict} for r in bench.rows],
        "errors": bench.errors,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    if bench.errors:
        print(f"{len(bench.errors)} section(s) failed: " + "; ".join(e["section"] for e in bench.errors))
    return 1 if bench.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
