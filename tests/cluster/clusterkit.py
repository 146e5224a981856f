"""Cluster test helpers: engines with a cluster profile, an index rebuilt from KV events alone, and
server restarts (the fixtures built on them are in this directory's conftest.py).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import xxhash

import engine_runs
from engine_runs import TOKENS_PER_BLOCK
from kvbm_core.cluster import plugin
from kvbm_core.leader.slot_state import MATCHABLE
from kvbm_core.testing import ExecutorConfig, ReferenceExecutor, RequestSpec, RunResult
from kvbm_core.transports import NatsTransport
STORAGE_TIER = {"cpu": "host_pinned", "disk": "disk"}


# ------------------------------------------------------------------------------------ servers
def restart(server: Any) -> None:
    """Stop ``server`` (a tests/conftest.py ServerProcess) if it runs, start it again on the same
    command line (port, data directory), and wait until it answers."""
    argv = list(server.proc.args)
    server.stop()
    ready = (lambda: _nats_ready(server.port)) if server.name == "nats" else (lambda: _etcd_healthy(server.url))
    server.launch(argv, ready)


def _nats_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(4).startswith(b"INFO")
    except OSError:
        return False


def _etcd_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return b'"health":"true"' in response.read()
    except OSError:
        return False


def wait_for(condition: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------- workload
def conversations(users: int = 3, max_new_tokens: int = 4, steps_between_turns: int = 10,
                  **kwargs: Any) -> list[RequestSpec]:
    """tests/engine_runs.py's chats, smaller: so that tiers fill and evict within a cluster test."""
    return engine_runs.conversations(users=users, max_new_tokens=max_new_tokens,
                                     steps_between_turns=steps_between_turns, **kwargs)


def executor_config(**overrides: Any) -> ExecutorConfig:
    """tests/engine_runs.py's engine, without the KV oracle (cluster tests check events, not bytes)."""
    return engine_runs.executor_config(**{"oracle": False, **overrides})


def router_hashes(tokens: list[int], salt: str | None = None) -> list[tuple[int, int, int | None]]:
    """``(sequence hash, local hash, parent)`` of each full block, from Dynamo's documented algorithm
    (seed 1337, a salt adding XXH3-64(salt, seed 1)), computed here independently of kvbm."""
    seed = 1337 if not salt else (1337 + xxhash.xxh3_64_intdigest(salt.encode(), seed=1)) % 2**64
    out = []
    parent = None
    for i in range(len(tokens) // TOKENS_PER_BLOCK):
        block = b"".join(t.to_bytes(4, "little") for t in tokens[i * TOKENS_PER_BLOCK : (i + 1) * TOKENS_PER_BLOCK])
        local = xxhash.xxh3_64_intdigest(block, seed=seed)
        seq = local if parent is None else xxhash.xxh3_64_intdigest(
            parent.to_bytes(8, "little") + local.to_bytes(8, "little"), seed=seed)
        out.append((seq, local, parent))
        parent = seq
    return out


# ---------------------------------------------------------------------------------- engines
@dataclass
class Engine:
    executor: ReferenceExecutor

    def run(self, specs: list[RequestSpec], on_finish: Callable[..., Any] | None = None) -> RunResult:
        result = self.executor.run(specs, on_finish=on_finish)
        for worker in self.executor.workers:
            assert worker.wait_until_idle(timeout=60.0)
        _ = self.executor.scheduler.stats  # applies every finished operation (their hooks fire)
        return result

    @property
    def manager(self) -> Any:
        return self.executor.scheduler._manager

    def leader_view(self) -> dict[str, set[int]]:
        """The sequence hashes each tier holds readable (tiers holding none left out), from the
        leader's own slot states; blocks of unknown tokens (hash 0) are not counted."""
        view = {}
        for tier in (self.manager.host, self.manager.disk):
            if tier is not None:
                held = np.isin(tier.state, [int(s) for s in MATCHABLE])
                hashes = {h for h in tier.seq[held].tolist() if h}
                if hashes:
                    view[STORAGE_TIER[tier.kind]] = hashes
        return view

    @property
    def publisher(self) -> Any:
        services = plugin.active_services()
        assert services is not None and services.pipeline is self.executor.scheduler._pipeline
        return services.publisher

    def close(self) -> None:
        for worker in self.executor.workers:
            worker.close()
        self.executor.scheduler.close()


# -------------------------------------------------------------------------------- subscriber
class EventIndex:
    """Each worker's blocks per storage tier, rebuilt from router events alone (as a router would).

    ``tiers[worker][storage_tier][block_hash] = (parent_hash, tokens_hash)``. Also checks what a
    router relies on: event ids increase per worker, a stored chain links each block to the previous.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tiers: defaultdict[int, defaultdict[str, dict[int, tuple[int | None, int]]]] = \
            defaultdict(lambda: defaultdict(dict))
        self.last_id: dict[int, int] = {}
        self.counts: defaultdict[str, int] = defaultdict(int)
        self.problems: list[str] = []

    def apply(self, subject: str, payload: bytes) -> None:
        event = json.loads(payload)
        worker, tier, inner = event["worker_id"], event["storage_tier"], event["event"]
        data = inner["data"]
        with self.lock:
            if inner["event_id"] <= self.last_id.get(worker, 0):
                self.problems.append(f"event id {inner['event_id']} after {self.last_id[worker]}")
            self.last_id[worker] = inner["event_id"]
            if data == "cleared":
                self.counts["cleared"] += 1
                self.tiers[worker].clear()
            elif "stored" in data:
                self.counts["stored"] += 1
                parent = data["stored"]["parent_hash"]
                for block in data["stored"]["blocks"]:
                    self.tiers[worker][tier][block["block_hash"]] = (parent, block["tokens_hash"])
                    parent = block["block_hash"]
            else:
                self.counts["removed"] += 1
                for h in data["removed"]["block_hashes"]:
                    self.tiers[worker][tier].pop(h, None)

    def held(self, worker: int) -> dict[str, set[int]]:
        with self.lock:
            return {tier: set(blocks) for tier, blocks in self.tiers[worker].items() if blocks}

    def blocks(self, worker: int) -> dict[int, tuple[int | None, int]]:
        with self.lock:
            return {h: v for blocks in self.tiers[worker].values() for h, v in blocks.items()}


@dataclass
class Subscriber:
    transport: NatsTransport
    index: EventIndex
    subject: str

    def ask_resync(self) -> None:
        """Ask every publisher for a full resynchronisation (what a subscriber does after reconnecting)."""
        self.transport.publish(f"{self.subject}.resync", b"")
        self.transport.flush()


def cluster_profile(tiers: list[dict[str, Any]], nats_url: str | None = None, etcd_url: str | None = None,
                    **kv_events: Any) -> dict[str, Any]:
    transports, options = ["inproc"], {}
    if nats_url is not None:
        transports.append("nats")
        options["nats"] = {"servers": [nats_url], "timeout_s": 3,
                           "kv_events": {"flush_interval_s": 0.02, **kv_events}}
    if etcd_url is not None:
        transports.append("etcd")
        options["etcd"] = {"endpoints": [etcd_url], "timeout_s": 3, "registration": {"lease_ttl_s": 3}}
    return {"tiers": tiers, "transports": transports, "transport_options": options}
