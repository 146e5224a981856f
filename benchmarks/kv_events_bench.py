"""What KV events cost the leader's scheduling thread: per hook call, and per hashed block.

Plain script (CPU only); it starts a nats-server on a free loopback port unless ``--nats URL`` is
given, and a real publisher connected to it publishes in the background while the hooks are timed::

    python benchmarks/kv_events_bench.py --out bench-out/kv_events.json

Measured, in **CPU time of the calling thread** (``time.thread_time``: what the leader thread itself
spends, not time it was preempted by other processes; wall time alongside):

- ``hook``: one ``kvbm_blocks_stored`` / ``kvbm_blocks_removed`` call through the registered hook
  function (record update + queue append) for batches of 1, 16, 256 and 2048 blocks, with the
  publisher running; and the same call with no publisher (the hook's cost when events are off).
- ``chain``: the leader's Dynamo sequence chain hashing 2048 blocks of 32 tokens, without and with
  the lineage sink the publisher attaches (and, for scale, with the indexing the publisher's thread
  then does, timed here on the same thread).

Each figure is sampled in ``--rounds`` interleaved rounds; the report gives the median and p99 over
all samples and the median of the quietest round (``best round``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from array import array
from pathlib import Path

import numpy as np

from kvbm_core.cluster import lineage, plugin
from kvbm_core.cluster.kv_events import KvEventPublisher
from kvbm_core.identity import DynamoSequenceChain, dynamo_salt_hash, token_array
from kvbm_core.logging import configure
from kvbm_core.settings.model import LoggingSettings
from kvbm_core.transports.nats import NatsOptions

SIZES = (1, 16, 256, 2048)


def us(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_us": statistics.median(ordered) * 1e6, "p99_us": ordered[int(0.99 * (len(ordered) - 1))] * 1e6}


def timed(call, rounds: int, per_round: int) -> dict:
    cpu_rounds, wall = [], []
    for _ in range(rounds):
        cpu = []
        for _ in range(per_round):
            c, w = time.thread_time(), time.perf_counter()
            call()
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - w)
        cpu_rounds.append(cpu)
    flat = [x for r in cpu_rounds for x in r]
    best = min(cpu_rounds, key=statistics.median)
    return {"cpu": us(flat), "cpu_best_round_median_us": statistics.median(best) * 1e6, "wall": us(wall),
            "samples": len(flat)}


def start_nats() -> tuple[subprocess.Popen, str]:
    binary = shutil.which("nats-server", path="/usr/sbin:/usr/bin:/usr/local/bin")
    if binary is None:
        sys.exit("nats-server not found: install Debian's nats-server (./dev setup) or pass --nats URL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"nats://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("nats-server did not start")


def bench_hooks(url: str, rounds: int, per_round: int) -> dict:
    rng = np.random.default_rng(0)
    batches = {n: rng.integers(1, 2**63, n, dtype=np.uint64) for n in SIZES}
    keys = {n: np.zeros((n, 2), np.uint64) for n in SIZES}
    out: dict = {}
    # Events off: the hook finds no publisher.
    for n in SIZES:
        out[f"stored_off_{n}"] = timed(lambda n=n: plugin.cluster_blocks_stored("cpu", "d2h", keys[n], batches[n]),
                                       rounds, per_round)
    pending = lineage.attach()
    publisher = KvEventPublisher(NatsOptions(servers=[url], kv_events={"queue_size": 1_000_000}), 1,
                                 {"cpu": 2}, pending)
    for n, seq in batches.items():  # lineage, as the chain would have recorded it
        pending.record(None, array("Q", seq.tolist()), seq.tolist())
    publisher.start()
    deadline = time.monotonic() + 10
    while not publisher.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    plugin._active = plugin.ClusterServices(pipeline=None, worker_id=1, publisher=publisher)
    try:
        for n in SIZES:
            out[f"stored_{n}"] = timed(lambda n=n: plugin.cluster_blocks_stored("cpu", "d2h", keys[n], batches[n]),
                                       rounds, per_round)
            out[f"removed_{n}"] = timed(lambda n=n: plugin.cluster_blocks_removed("cpu", keys[n], batches[n]),
                                        rounds, per_round)
        time.sleep(0.5)
        out["published_events"] = publisher.counts.published_events
        out["dropped_blocks"] = publisher.counts.dropped_blocks
    finally:
        plugin._active = None
        publisher.close()
        lineage.detach(pending)
    return out


def bench_chain(rounds: int, per_round: int) -> dict:
    tokens = token_array(np.random.default_rng(1).integers(0, 150_000, 2048 * 32).tolist())
    seed = dynamo_salt_hash()

    def chain() -> None:
        DynamoSequenceChain(seed, 32).range_bytes(tokens, 0, 2048)

    out = {"without_sink": timed(chain, rounds, per_round)}
    pending = lineage.attach()
    try:
        def chain_and_index() -> None:  # the publisher thread indexes what the sink queued
            chain()
            pending.absorb()

        out["with_sink"] = timed(chain, rounds, per_round)
        out["with_sink_plus_publisher_indexing"] = timed(chain_and_index, rounds, per_round)
    finally:
        lineage.detach(pending)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats", help="URL of a running nats-server (default: start one on a free port)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=400)
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args()
    configure(LoggingSettings(level="warning"))  # log lines to stderr, the report alone on stdout
    proc = None
    url = args.nats
    if url is None:
        proc, url = start_nats()
    try:
        report = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": __import__("os").cpu_count(), "processor": platform.processor()},
            "command": " ".join(sys.argv),
            "hook": bench_hooks(url, args.rounds, args.per_round),
            "chain_2048_blocks": bench_chain(args.rounds, max(1, args.per_round // 20)),
        }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
