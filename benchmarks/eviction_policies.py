"""Host hit rates of eviction policies, replaying the leader's access pattern of multi-round QA.

Plain script (no GPU, no torch; about 25 s of CPU by default)::

    python benchmarks/eviction_policies.py --out bench-out/eviction_policies.json
    python benchmarks/eviction_policies.py --candidates                     # also slru, s3fifo, lfu_da
    python benchmarks/eviction_policies.py --disk 0.95 --slow-disk          # cpu_disk, disk never read
    python benchmarks/eviction_policies.py --policy lru --policy 'scan_resistant:{"levels": 1}'

Each scenario is a ``kvbm bench`` workload (:mod:`kvbm_core.bench.workload`: the same token ids, the
same sizes) turned into the sequence of calls the block manager makes on the host tier, replayed
through a real :class:`~kvbm_core.leader.tier_state.TierState` with each policy:

- Requests are served one after the other in send order (users join in turn; each later round
  after every user's previous one, as LMBenchmark's pacing does when requests finish within their
  gap). A request's answer is drawn from its own seeded generator, and the next round's prompt holds
  it, as in the bench. Requests that overlap in a real run interleave their calls; here they do not,
  which is harsher on ``lru`` in a loop (0% here; 11% host hits on an H200 with the long-input
  preset, a 32 GB host tier and ``cpu_disk``).
- The device pool is an LRU of ``device_blocks`` blocks, a finished sequence's leading blocks the
  most recent (the engine evicts leaves first). A prompt's device prefix is the leading run of its
  blocks there; it does not depend on the host tier, so it is computed once per scenario.
- The host lookup covers the blocks after the device prefix, up to ``(prompt_len - 1) //
  tokens_per_block``, and stops at the first block the host cannot serve, as ``BlockManager.match``
  does. Hits are held, then released (the load finished): the policy sees them added again.
- Every block computed (after the device prefix and the hits, prompt and answer, up to the last
  token whose KV the engine wrote) is stored write-through: blocks the host already holds are
  skipped, the others are allocated (evicting through the policy) and completed.
- With ``--disk`` a disk tier behind the real :class:`~kvbm_core.leader.disk_offload.DiskOffloader`
  and ``frequency`` filter runs as in the ``cpu_disk`` profile: blocks are offered on every store,
  skipped duplicate store and hit (an admitted block is held in the host until copied), and each
  request's copies run before the next request (their end re-adds the host slot, as a use). Disk
  blocks of a prompt's run are staged into host slots, then loaded from there. ``--slow-disk`` keeps
  disk blocks out of matches, as the cost model did on a machine whose disk reads slower than the
  model recomputes.

Scenarios: the ``long-input`` and ``embedded`` presets; ``many-users`` (40 sessions); ``growing-chat``
(long answers: each round adds much new context); ``shifting-users`` (a second group of users
replaces the first: how fast a policy lets an old working set go); ``zipf-chat`` and ``zipf-long``
(some users come back far more often than others: recency matters more than loops).

Host capacities are fractions of the working set (the distinct blocks the run stores with an
unbounded host). The host hit rate is the one ``kvbm bench`` reports: blocks found in the host over
blocks looked up beyond the device prefix, summed over requests. Wall seconds per replay are
reported too; they include the tier's own bookkeeping.
"""

from __future__ import annotations

import argparse
import heapq
import json
import platform
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvbm_core.bench.workload import MultiRoundQA, WorkloadConfig
from kvbm_core.errors import ConfigError
from kvbm_core.identity import Namespace, block_keys
from kvbm_core.interfaces import EvictionPolicy, OffloadFilter, TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.leader.disk_offload import CheckedAdmission, DiskOffloader
from kvbm_core.leader.tier_state import ABSENT, DEFAULT_PRIORITY, TierState
from kvbm_core.registry import Registry

DEFAULT_FRACTIONS = (0.5, 0.75, 0.9, 1.1)
DEFAULT_POLICIES = ("lru", "scan_resistant")


@dataclass(frozen=True)
class Scenario:
    """A workload and the engine around it: tokens per block and the device pool's size."""

    name: str
    about: str
    workload: WorkloadConfig
    tokens_per_block: int
    device_blocks: int
    zipf_requests: int = 0  # > 0: that many requests, each from a user drawn by Zipf(1) popularity
    phases: int = 1  # users split into this many groups, served one group after the other


def _qa(users: int, rounds: int, system: int, history: int, question: int, answer: int, vocab: int) -> WorkloadConfig:
    return WorkloadConfig(users=users, rounds=rounds, system_tokens=system, history_tokens=history,
                          question_tokens=question, answer_tokens=answer, qps=1.0, seed=0, vocab_size=vocab)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("long-input", "kvbm bench --preset long-input: 15 users x 4 rounds, 1000 + 20000 tokens",
                 _qa(15, 4, 1000, 20000, 16, 100, 128256), tokens_per_block=32, device_blocks=2048),
        Scenario("embedded", "kvbm bench (embedded preset): 8 users x 8 rounds, 128 + 512 tokens",
                 _qa(8, 8, 128, 512, 16, 16, 512), tokens_per_block=16, device_blocks=160),
        Scenario("many-users", "40 users x 6 rounds, 500 + 2000 tokens, 200-token answers",
                 _qa(40, 6, 500, 2000, 32, 200, 32000), tokens_per_block=32, device_blocks=256),
        Scenario("shifting-users", "2 groups of 15 users x 4 rounds, one after the other, 500 + 4000 tokens",
                 _qa(30, 4, 500, 4000, 16, 100, 32000), tokens_per_block=32, device_blocks=512, phases=2),
        Scenario("growing-chat", "8 users x 12 rounds, 200 + 300 tokens, 400-token questions and answers",
                 _qa(8, 12, 200, 300, 400, 400, 32000), tokens_per_block=16, device_blocks=256),
        Scenario("zipf-chat", "300 requests of 60 users drawn by Zipf(1) popularity, 300 + 1000 tokens",
                 _qa(60, 1, 300, 1000, 64, 128, 32000), tokens_per_block=16, device_blocks=256,
                 zipf_requests=300),
        Scenario("zipf-long", "200 requests of 25 users drawn by Zipf(1) popularity, 1000 + 8000 tokens",
                 _qa(25, 1, 1000, 8000, 32, 100, 32000), tokens_per_block=32, device_blocks=512,
                 zipf_requests=200),
    )
}


# ------------------------------------------------------------------------------------ trace
@dataclass(frozen=True)
class Request:
    """What the leader sees of one request: its block keys and where the host lookup starts and ends."""

    keys: np.ndarray  # [n, 2]: every block whose KV the engine computes or reuses, prompt then answer
    device_blocks: int  # the device-reused prefix
    lookup_end: int  # (prompt_len - 1) // tokens_per_block
    prompt_blocks: int  # full blocks of the prompt (stored in one batch, the rest one per decode step)


def send_order(scenario: Scenario) -> list[tuple[int, int]]:
    """``(user, round)`` in send order."""
    cfg = scenario.workload
    if scenario.zipf_requests:
        rng = np.random.default_rng([cfg.seed, 0x21F])
        weights = 1.0 / np.arange(1, cfg.users + 1)
        users = rng.choice(cfg.users, size=scenario.zipf_requests, p=weights / weights.sum())
        rounds: dict[int, int] = {}
        order = []
        for user in users.tolist():
            order.append((user, rounds.get(user, 0)))
            rounds[user] = rounds.get(user, 0) + 1
        return order
    per_phase = -(-cfg.users // scenario.phases)
    return [(user, r) for lo in range(0, cfg.users, per_phase) for r in range(cfg.rounds)
            for user in range(lo, min(lo + per_phase, cfg.users))]


def build_trace(scenario: Scenario) -> list[Request]:
    cfg = scenario.workload
    tpb = scenario.tokens_per_block
    namespace = Namespace.from_layout(BlockLayout(1, 2, tpb, "float16", tpb), "eviction-bench", 1)
    qa = MultiRoundQA(cfg)
    sequences: dict[int, np.ndarray] = {}  # user -> previous prompt + answer
    device: OrderedDict[int, None] = OrderedDict()  # first key lane -> None, least recent first
    trace = []
    for user, round_ in send_order(scenario):
        if round_ == 0:
            prompt = qa.first_prompt(user)
        else:
            prompt = np.concatenate([sequences[user], qa.question(user, round_)])
        answer = np.random.default_rng([cfg.seed, 0xA5, user, round_]).integers(0, cfg.vocab_size, cfg.answer_tokens)
        sequence = np.concatenate([prompt, answer])
        sequences[user] = sequence
        keys = block_keys(namespace, sequence[:-1])  # the last answer token's KV is never computed
        lookup_end = (len(prompt) - 1) // tpb
        lanes = keys[:, 0].tolist()
        reused = 0
        while reused < lookup_end and lanes[reused] in device:
            reused += 1
        trace.append(Request(keys, reused, lookup_end, len(prompt) // tpb))
        for lane in reversed(lanes):  # the leading blocks end up the most recent
            device[lane] = None
            device.move_to_end(lane)
        while len(device) > scenario.device_blocks:
            device.popitem(last=False)
    return trace


def working_set(trace: Sequence[Request]) -> int:
    """Distinct blocks the run stores when nothing is ever evicted."""
    return len(np.unique(np.concatenate([r.keys[:, 0] for r in trace])))


# ----------------------------------------------------------------------------------- replay
@dataclass
class Replay:
    """Counts of one replay."""

    queried: int = 0
    host_hits: int = 0
    disk_hits: int = 0
    stored: int = 0
    seconds: float = 0.0

    @property
    def host_hit_rate(self) -> float:
        return self.host_hits / self.queried if self.queried else 0.0

    @property
    def hit_rate(self) -> float:
        """Host and disk hits together."""
        return (self.host_hits + self.disk_hits) / self.queried if self.queried else 0.0


def replay(trace: Sequence[Request], policy: EvictionPolicy, host_slots: int, *,
           disk: tuple[EvictionPolicy, int, OffloadFilter] | None = None, disk_loads: bool = True) -> Replay:
    """The block manager's host-tier calls for ``trace``; ``disk``: (policy, slots, admission filter).

    Disk blocks of a prompt's run are staged into host slots and then loaded from there, as the
    block manager does; ``disk_loads=False`` leaves them out of the run (the cost model's choice for
    a disk slower than recomputing)."""
    host = TierState("cpu", TierLevel.HOST, host_slots, policy)
    disk_tier = offloader = None
    if disk is not None:
        disk_policy, disk_slots, admission = disk
        disk_tier = TierState("disk", TierLevel.DISK, disk_slots, disk_policy)
        offloader = DiskOffloader(host, disk_tier, CheckedAdmission(admission, "kvbm-policy-frequency"))
    out = Replay()
    start = time.perf_counter()
    for req in trace:
        keys, first = req.keys, req.device_blocks
        run = 0
        if first < req.lookup_end:
            wanted = keys[first:req.lookup_end]
            slots = host.lookup(wanted)
            in_host = host.matchable(slots)
            found = in_host.copy()
            if disk_tier is not None and disk_loads:
                found |= disk_tier.matchable(disk_tier.lookup(wanted))
            run = len(found) if found.all() else int(np.argmin(found))
            out.queried += len(wanted)
            host.hold(slots[:run][in_host[:run]])  # before staging picks victims
            on_disk = np.flatnonzero(~in_host[:run])
            staged = np.zeros(0, np.int64)
            if len(on_disk):
                assert disk_tier is not None
                staged = _stage(host, disk_tier, wanted[on_disk])
                if len(staged) < len(on_disk):  # no room to stage the rest: the run ends there
                    cut = int(on_disk[len(staged)])
                    host.release(slots[cut:run][in_host[cut:run]])
                    run = cut
                slots[on_disk[: len(staged)]] = staged
                host.hold(staged)
            out.host_hits += run - len(staged)
            out.disk_hits += len(staged)
            if offloader is not None:
                offloader.offer(wanted[:run])
            host.release(slots[:run])  # the load finished
        computed = first + run
        for lo, hi in [(computed, max(computed, req.prompt_blocks))] + [
            (b, b + 1) for b in range(max(computed, req.prompt_blocks), len(keys))
        ]:
            if hi > lo:
                out.stored += _store(host, keys[lo:hi], offloader)
        if offloader is not None:
            _drain(offloader)
    out.seconds = time.perf_counter() - start
    return out


def _stage(host: TierState, disk: TierState, keys: np.ndarray) -> np.ndarray:
    """Disk blocks read into host slots before they are promised (``DISK2H``); the host slots."""
    sources = disk.lookup(keys)
    disk.hold(sources)
    targets, _, _ = host.allocate(len(keys))
    n = len(targets)
    host.begin_write(targets, keys[:n], disk.seq[sources[:n]], disk.priority[sources[:n]])
    host.complete_write(targets)
    disk.release(sources)
    return targets


def _store(host: TierState, keys: np.ndarray, offloader: DiskOffloader | None) -> int:
    present = host.lookup(keys) != ABSENT
    if offloader is not None and present.any():
        offloader.offer(keys[present])
    fresh = keys[~present]
    slots, _, _ = host.allocate(len(fresh))
    fresh = fresh[: len(slots)]
    if len(slots):
        host.begin_write(slots, fresh, np.zeros(len(slots), np.uint64), np.full(len(slots), DEFAULT_PRIORITY, np.int16))
        host.complete_write(slots)
        if offloader is not None:
            offloader.offer(fresh)
    return len(slots)


def _drain(offloader: DiskOffloader) -> None:
    while (claimed := offloader.plan(lambda *_: None)) is not None:
        src, dst, _, _ = claimed
        offloader.done(src, dst, failed=False)


# ------------------------------------------------------------------------------- candidates
class _Candidate(EvictionPolicy):
    """A measured alternative, not shipped: one priority only (this replay uses one).

    Without block keys a policy keeps no history of evicted blocks (no ghost lists), so these are
    the ghostless forms. A slot added again before ``discard`` is a use, as in ``scan_resistant``.
    """

    def __init__(self, num_slots: int, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(num_slots, options)
        self._known: set[int] = set()

    def add(self, slot: int, priority: int, tick: int) -> None:
        used = slot in self._known
        self._known.add(slot)
        self._remove(slot)
        self._insert(slot, used, tick)

    def discard(self, slot: int) -> None:
        self._known.discard(slot)
        self._remove(slot)

    def _insert(self, slot: int, used: bool, tick: int) -> None:
        raise NotImplementedError

    def _remove(self, slot: int) -> None:
        raise NotImplementedError


class SegmentedLru(_Candidate):
    """SLRU: probation FIFO, protected LRU (80% of the slots), protected overflow back to probation."""

    name = "slru"

    def __init__(self, num_slots: int, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(num_slots, options)
        self._probation: OrderedDict[int, None] = OrderedDict()
        self._protected: OrderedDict[int, None] = OrderedDict()
        self._protected_max = max(1, int(0.8 * num_slots))

    def _insert(self, slot: int, used: bool, tick: int) -> None:
        if not used:
            self._probation[slot] = None
            return
        self._protected[slot] = None
        if len(self._protected) > self._protected_max:
            self._probation[self._protected.popitem(last=False)[0]] = None

    def _remove(self, slot: int) -> None:
        self._probation.pop(slot, None)
        self._protected.pop(slot, None)

    def victim(self) -> int | None:
        queue = self._probation or self._protected
        return queue.popitem(last=False)[0] if queue else None

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)


class S3Fifo(_Candidate):
    """S3-FIFO without its ghost queue: a small FIFO (10%), a main FIFO with 2-bit use counts."""

    name = "s3fifo"

    def __init__(self, num_slots: int, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(num_slots, options)
        self._small: OrderedDict[int, None] = OrderedDict()
        self._main: OrderedDict[int, None] = OrderedDict()
        self._uses: dict[int, int] = {}
        self._small_max = max(1, num_slots // 10)

    def add(self, slot: int, priority: int, tick: int) -> None:
        if slot in self._small or slot in self._main:  # a use while queued: count it, stay in place
            self._uses[slot] = min(3, self._uses[slot] + 1)
            return
        super().add(slot, priority, tick)

    def _insert(self, slot: int, used: bool, tick: int) -> None:
        self._uses[slot] = int(used)
        (self._main if used else self._small)[slot] = None

    def _remove(self, slot: int) -> None:
        self._small.pop(slot, None)
        self._main.pop(slot, None)
        self._uses.pop(slot, None)

    def victim(self) -> int | None:
        while self._small or self._main:
            if self._small and (len(self._small) >= self._small_max or not self._main):
                slot, _ = self._small.popitem(last=False)
                if self._uses[slot]:  # used while small: promoted
                    self._uses[slot] = 0
                    self._main[slot] = None
                    continue
            else:
                slot, _ = self._main.popitem(last=False)
                if self._uses[slot]:  # used: one more round
                    self._uses[slot] -= 1
                    self._main[slot] = None
                    continue
            del self._uses[slot]
            return slot
        return None

    def __len__(self) -> int:
        return len(self._small) + len(self._main)


class LfuDynamicAging(_Candidate):
    """LFU-DA: evict the smallest ``age + uses`` (age: that of the last victim), ties least recent."""

    name = "lfu_da"

    def __init__(self, num_slots: int, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(num_slots, options)
        self._heap: list[tuple[int, int, int]] = []
        self._entry: dict[int, tuple[int, int, int]] = {}
        self._uses: dict[int, int] = {}
        self._age = 0

    def _insert(self, slot: int, used: bool, tick: int) -> None:
        uses = self._uses[slot] = self._uses.get(slot, 0) + 1 if used else 1
        entry = self._entry[slot] = (self._age + uses, tick, slot)
        heapq.heappush(self._heap, entry)

    def _remove(self, slot: int) -> None:
        self._entry.pop(slot, None)  # its heap entry is skipped when popped

    def discard(self, slot: int) -> None:
        super().discard(slot)
        self._uses.pop(slot, None)

    def victim(self) -> int | None:
        while self._heap:
            entry = heapq.heappop(self._heap)
            if self._entry.get(entry[2]) is entry:
                del self._entry[entry[2]]
                self._age = entry[0]
                return entry[2]
        return None

    def __len__(self) -> int:
        return len(self._entry)


CANDIDATES: dict[str, type[EvictionPolicy]] = {c.name: c for c in (SegmentedLru, S3Fifo, LfuDynamicAging)}


# ------------------------------------------------------------------------------------- main
@dataclass(frozen=True)
class PolicyChoice:
    label: str
    cls: type[EvictionPolicy]
    options: Mapping[str, Any] = field(default_factory=dict)


def run(scenarios: Sequence[Scenario], fractions: Sequence[float], policies: Sequence[PolicyChoice], *,
        disk_fraction: float | None = None, disk_loads: bool = True, registry: Registry | None = None) -> list[dict[str, Any]]:
    rows = []
    for scenario in scenarios:
        trace = build_trace(scenario)
        blocks = working_set(trace)
        for fraction in fractions:
            slots = max(1, round(blocks * fraction))
            for choice in policies:
                disk = None
                if disk_fraction is not None:
                    assert registry is not None
                    filter_cls = registry.get("filter", "frequency", "frequency")
                    disk_slots = max(1, round(blocks * disk_fraction))
                    disk = (choice.cls(disk_slots, choice.options), disk_slots, filter_cls({}, clock=lambda: 0.0))
                result = replay(trace, choice.cls(slots, choice.options), slots, disk=disk, disk_loads=disk_loads)
                rows.append({"scenario": scenario.name, "working_set_blocks": blocks, "fraction": fraction,
                             "host_slots": slots, "policy": choice.label, "options": dict(choice.options),
                             "host_hit_rate": result.host_hit_rate, "hit_rate": result.hit_rate, **asdict(result)})
    return rows


def table(rows: Sequence[Mapping[str, Any]], metric: str = "host_hit_rate") -> str:
    labels = list(dict.fromkeys(r["policy"] for r in rows))
    cells: dict[tuple[str, float], dict[str, float]] = {}
    for r in rows:
        cells.setdefault((r["scenario"], r["fraction"]), {})[r["policy"]] = r[metric]
    width = max(14, *(len(label) + 2 for label in labels))
    lines = [f"{'scenario':<14}{'host/ws':>8}" + "".join(f"{label:>{width}}" for label in labels)]
    for (scenario, fraction), by_policy in cells.items():
        lines.append(f"{scenario:<14}{fraction:>8.2f}"
                     + "".join(f"{100 * by_policy[label]:>{width - 1}.1f}%" for label in labels))
    return "\n".join(lines)


def _policy_arg(text: str, registry: Registry) -> PolicyChoice:
    name, _, raw = text.partition(":")
    try:
        options = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise ConfigError("--policy", f"{text!r}: options are not JSON ({exc})") from None
    if not isinstance(options, dict):
        raise ConfigError("--policy", f"{text!r}: options must be a JSON object")
    cls = CANDIDATES.get(name) or registry.get("eviction", name, "--policy")
    if name not in CANDIDATES and hasattr(cls, "validate_options"):
        cls.validate_options(options, f"--policy {name} options")
    return PolicyChoice(text, cls, options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default: all")
    parser.add_argument("--fraction", action="append", type=float,
                        help=f"host capacity / working set, repeatable; default: {' '.join(map(str, DEFAULT_FRACTIONS))}")
    parser.add_argument("--policy", action="append",
                        help="installed eviction policy (or candidate: " + ", ".join(CANDIDATES) + ") as NAME or "
                             f"NAME:JSON-OPTIONS, repeatable; default: {' '.join(DEFAULT_POLICIES)}")
    parser.add_argument("--candidates", action="store_true", help="also measure every candidate")
    parser.add_argument("--disk", type=float, metavar="FRACTION",
                        help="add a disk tier of FRACTION x the working set behind the frequency filter (cpu_disk)")
    parser.add_argument("--slow-disk", action="store_true",
                        help="with --disk: matches never load from disk (the cost model found it slower than "
                             "recomputing), but host -> disk copies still run")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    registry = Registry()
    try:
        names = list(args.policy or DEFAULT_POLICIES) + (list(CANDIDATES) if args.candidates else [])
        policies = [_policy_arg(p, registry) for p in names]
    except ConfigError as exc:
        parser.error(str(exc))
    scenarios = [SCENARIOS[s] for s in (args.scenario or SCENARIOS)]
    rows = run(scenarios, args.fraction or DEFAULT_FRACTIONS, policies, disk_fraction=args.disk,
               disk_loads=not args.slow_disk, registry=registry)
    print("host hit rate\n" + table(rows))
    if args.disk is not None:
        print("\nhost + disk hit rate\n" + table(rows, "hit_rate"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"argv": sys.argv, "python": platform.python_version(),
                                        "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
                                        "scenarios": {s.name: s.about for s in scenarios}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
