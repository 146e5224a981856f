"""Candidate stores for a shared remote KV tier: put/get of KV-block-sized objects on loopback.

Each candidate runs as a real server started here on a free loopback port, driven through its
ordinary Python client, with objects of 1 MB and 4 MB (a block of Qwen3-0.6B is 3.67 MB, of
Llama-3-8B 4.19 MB at 32 tokens) in batches of 64:

- ``redis``: Debian's ``redis-server`` (persistence off, ``maxmemory`` with ``allkeys-lru``), the
  ``redis`` client; a batch is one pipeline (64 SET / 64 GET, one round trip).
- ``jetstream-memory`` / ``jetstream-file``: ``nats-server -js`` with an object store bucket in
  memory / on disk, nats-py's object store; a batch is 64 puts / gets, 8 at a time (with all 64 at
  once nats-py's gets time out and the server drops the connection as a slow consumer).
- ``mooncake``: Mooncake Store (``mooncake-transfer-engine``), when its client imports here; the
  reason it was skipped is recorded otherwise.

Reported per store and size: batched put and get throughput (GB/s: bytes of the batch over its wall
time), batch latency p50/p99, and the p50/p99 of single-object puts and gets issued one at a time.
Every object read is compared with what was written. Then **eviction when full**: a store capped at
``--cap-mb`` receives twice that, and the report says whether puts failed and how many of the first
objects survived. Whether each store can run clustered is a fact about the server, listed in
``clustering``.

The clients are not dependencies of kvbm-core; install them into the environment that runs this::

    apt-get install redis-server nats-server          # the servers (Debian packages)
    pip install redis nats-py                        # the clients
    pip install mooncake-transfer-engine             # optional: skipped where it cannot run
    python benchmarks/remote_store_bench.py --out benchmarks/results/cpu-vm/remote_store.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MB = 10**6
BATCH = 64
JETSTREAM_CONCURRENCY = 8
SERVER_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/usr/local/bin"])

CLUSTERING = {
    "redis": "Redis Cluster: keys sharded over 16384 hash slots across primaries, each with replicas "
             "(asynchronous replication, automatic failover); the client follows MOVED redirections. "
             "Valkey (the Linux Foundation fork) keeps the same cluster protocol.",
    "jetstream": "JetStream runs clustered: each stream (an object store bucket is one) is replicated "
                 "to R=1..5 servers with Raft; placement by cluster/tags; clients connect to any server.",
    "mooncake": "Mooncake Store is distributed by design: a master keeps metadata, clients on every node "
                "contribute memory segments, objects are replicated across them and moved over RDMA/TCP; "
                "master high availability through etcd (or redis/k8s).",
}


# ------------------------------------------------------------------------------- utilities
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} did not listen on {port}")


def binary(name: str) -> str:
    path = shutil.which(name, path=SERVER_PATH)
    if path is None:
        raise RuntimeError(f"{name} is not installed")
    return path


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": statistics.median(ordered) * 1e3, "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1e3}


def objects(size: int, count: int, seed: int) -> list[bytes]:
    """Distinct pseudo-random payloads (incompressible, like KV bytes)."""
    rng = __import__("random").Random(seed)
    return [rng.randbytes(size) for _ in range(count)]


def measure(put_batch: Callable[[list[str], list[bytes]], None], get_batch: Callable[[list[str]], list[bytes]],
            size: int, rounds: int, singles: int) -> dict[str, Any]:
    data = objects(size, BATCH, seed=size)
    keys = [f"block-{size}-{i}" for i in range(BATCH)]
    put_s, get_s = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        put_batch(keys, data)
        put_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        got = get_batch(keys)
        get_s.append(time.perf_counter() - t)
        if got != data:
            raise AssertionError("a store returned other bytes than were written")
    single_put, single_get = [], []
    for i in range(singles):
        t = time.perf_counter()
        put_batch([keys[i % BATCH]], [data[i % BATCH]])
        single_put.append(time.perf_counter() - t)
        t = time.perf_counter()
        get_batch([keys[i % BATCH]])
        single_get.append(time.perf_counter() - t)
    batch_bytes = BATCH * size
    return {
        "object_bytes": size,
        "batch": BATCH,
        "rounds": rounds,
        "put_gbps": batch_bytes / statistics.median(put_s) / 1e9,
        "get_gbps": batch_bytes / statistics.median(get_s) / 1e9,
        "put_batch": percentiles(put_s),
        "get_batch": percentiles(get_s),
        "put_single": percentiles(single_put),
        "get_single": percentiles(single_get),
    }


# ------------------------------------------------------------------------------------ redis
class RedisStore:
    name = "redis"

    def __init__(self, workdir: Path, cap_mb: int | None) -> None:
        import redis

        self.port = free_port()
        argv = [binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(workdir), "--protected-mode", "no"]
        if cap_mb is not None:
            argv += ["--maxmemory", f"{cap_mb}mb", "--maxmemory-policy", "allkeys-lru"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        self.version = self.client.info()["redis_version"]

    def put(self, keys: list[str], data: list[bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, value in zip(keys, data):
            pipe.set(key, value)
        pipe.execute()

    def get(self, keys: list[str]) -> list[bytes]:
        return self.client.mget(keys)

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(10)


# -------------------------------------------------------------------------------- jetstream
class JetStreamStore:
    def __init__(self, workdir: Path, cap_mb: int | None, storage: str) -> None:
        import nats
        from nats.js.api import ObjectStoreConfig, StorageType

        self.name = f"jetstream-{storage}"
        self.port = free_port()
        argv = [binary("nats-server"), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(workdir / "js")]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        self.loop = asyncio.new_event_loop()
        self.nc = self.loop.run_until_complete(nats.connect(f"nats://127.0.0.1:{self.port}"))
        js = self.nc.jetstream()
        config = ObjectStoreConfig(bucket="kv", storage=StorageType.MEMORY if storage == "memory" else StorageType.FILE,
                                   max_bytes=cap_mb * 1024 * 1024 if cap_mb is not None else None)
        self.store = self.loop.run_until_complete(js.create_object_store("kv", config=config))
        v = self.nc.connected_server_version
        self.version = f"{v.major}.{v.minor}.{v.patch}"

    def put(self, keys: list[str], data: list[bytes]) -> None:
        self.loop.run_until_complete(self._bounded([self.store.put(k, d) for k, d in zip(keys, data)]))

    def get(self, keys: list[str]) -> list[bytes]:
        results = self.loop.run_until_complete(self._bounded([self.store.get(k) for k in keys]))
        return [r.data for r in results]

    @staticmethod
    async def _bounded(calls: list[Any]) -> list[Any]:
        gate = asyncio.Semaphore(JETSTREAM_CONCURRENCY)

        async def one(call: Any) -> Any:
            async with gate:
                return await call

        return await asyncio.gather(*(one(c) for c in calls))

    def close(self) -> None:
        self.loop.run_until_complete(self.nc.close())
        self.loop.close()
        self.proc.terminate()
        self.proc.wait(10)


# ------------------------------------------------------------------------------------ runs
def mooncake_status() -> str | None:
    """None when Mooncake Store's client imports here; otherwise why it cannot run."""
    try:
        from mooncake.store import MooncakeDistributedStore  # noqa: F401
    except ImportError as exc:
        if "No module named" in str(exc):
            return "not installed (pip install mooncake-transfer-engine)"
        return f"installed, but its client does not load here: {exc}"
    return None


def eviction(make: Callable[[int | None], Any], cap_mb: int, size: int) -> dict[str, Any]:
    """Fill a store capped at ``cap_mb`` with twice that; who failed, who survived."""
    store = make(cap_mb)
    count = 2 * cap_mb * MB // size
    data = objects(size, 8, seed=7)
    failed_puts, first_error = 0, None
    try:
        for i in range(count):
            try:
                store.put([f"e{i}"], [data[i % 8]])
            except Exception as exc:  # the store refused: that is its eviction behaviour
                failed_puts += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:200]
        survivors = []
        for i in range(count):
            try:
                value = store.get([f"e{i}"])[0]
                survivors.append(value == data[i % 8])
            except Exception:
                survivors.append(False)
    finally:
        store.close()
    half = count // 2
    return {"cap_mb": cap_mb, "objects_written": count, "object_bytes": size, "failed_puts": failed_puts,
            "first_error": first_error, "first_half_readable": sum(survivors[:half]),
            "second_half_readable": sum(survivors[half:])}


def run_store(make: Callable[[int | None], Any], sizes: list[int], rounds: int, singles: int, cap_mb: int) -> dict:
    store = make(None)
    try:
        out: dict[str, Any] = {"server_version": store.version,
                               "sizes": [measure(store.put, store.get, size, rounds, singles) for size in sizes]}
    finally:
        store.close()
    out["eviction"] = eviction(make, cap_mb, sizes[-1])
    return out


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 1e9, 1), "platform": platform.platform(),
            "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=8, help="batches of 64 per size")
    parser.add_argument("--singles", type=int, default=64, help="single-object puts and gets per size")
    parser.add_argument("--cap-mb", type=int, default=128, help="the capacity of the eviction test")
    parser.add_argument("--stores", nargs="+", default=["redis", "jetstream-memory", "jetstream-file", "mooncake"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = [int(s * MB) for s in args.sizes_mb]
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                              "command": " ".join(sys.argv), "clustering": CLUSTERING, "stores": {}}
    with tempfile.TemporaryDirectory(prefix="kvbm-remote-store-") as tmp:
        workdir = Path(tmp)
        makers: dict[str, Callable[[int | None], Any]] = {
            "redis": lambda cap: RedisStore(workdir, cap),
            "jetstream-memory": lambda cap: JetStreamStore(workdir / f"m{time.monotonic_ns()}", cap, "memory"),
            "jetstream-file": lambda cap: JetStreamStore(workdir / f"f{time.monotonic_ns()}", cap, "file"),
        }
        for name in args.stores:
            print(f"[remote_store_bench] {name}", file=sys.stderr)
            if name == "mooncake":
                reason = mooncake_status()
                report["stores"][name] = {"skipped": reason or "its client imports, but this script does not "
                                                                "drive it yet"}
                continue
            try:
                report["stores"][name] = run_store(makers[name], sizes, args.rounds, args.singles, args.cap_mb)
            except RuntimeError as exc:
                report["stores"][name] = {"skipped": str(exc)}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
