"""A model of TRT-LLM's scheduler and kvbm's workers around a real BlockManager, for the leader tests.

The engine side follows the connector contract's call order: device prefix match, then ``match``,
``allocated``, the scheduler output deltas (whole prompt and all prompt blocks in the first report,
the connector's tokens subtracted from the first ``computed_position``: every kvbm load is
synchronous), chunked prefill, decode with a new block id at each boundary, the overlap scheduler's
lagging token reports, and ``finish`` for finished or cancelled requests. It also stages for the
leader (``ready``/``stage``): disk blocks staged during ``match`` are copied slot to slot at once (some fail, as the
scenario says).

The worker side executes every operation on *symbolic* block contents: a device block or tier slot
holds the identity of the KV it contains (salt plus the whole token prefix), or a taint marker when it
was computed on top of a failed load. Every load checks that the slot it reads holds exactly the
prefix the destination block needs: a wrong pairing, a reused slot or a registered bad block fails
the test. Results come back late, out of order, and some fail, as the scenario says.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvbm_core.identity import RequestScope
from kvbm_core.leader import BlockManager
from kvbm_core.ops import LOADS, STORES, Op, OpResult, Route, StepOps


@dataclass
class RequestData:
    """TRT-LLM's ``RequestData`` (1.2 fields plus the optional ``priorities``)."""

    request_id: int
    new_tokens: list[int]
    new_block_ids: list[int]
    computed_position: int
    num_scheduled_tokens: int
    priorities: list[int] | None = None


@dataclass
class SimRequest:
    rid: int
    prompt: list[int]
    gen: int
    arrive: int
    cancel_after: int | None = None  # steps after admission
    salt: str | None = None
    priority: int | None = None
    # runtime
    state: str = "waiting"  # waiting, parked, running, done
    tokens: list[int] = field(default_factory=list)
    reported_tokens: int = 0
    reported_blocks: int = 0
    block_ids: list[int] = field(default_factory=list)
    computed: int = 0
    promised: int = 0
    sync_promise: bool = False
    first_reported: bool = False
    generated: int = 0
    admitted_at: int = 0
    tainted: bool = False


class Sim:
    """Drives one BlockManager through a request stream and checks it after every step."""

    def __init__(self, bm: BlockManager, *, device_blocks: int, chunk: int, overlap: bool, seed: int,
                 fail_rate: float = 0.0, deliver_rate: float = 0.6, partial_reuse_rate: float = 0.0,
                 fail_if: Callable[[Op], bool] | None = None, device_reuse: bool = True) -> None:
        self.bm = bm
        self.tpb = bm.tokens_per_block
        self.rng = random.Random(seed)
        self.chunk = chunk
        self.overlap = overlap
        self.fail_rate = fail_rate
        self.deliver_rate = deliver_rate
        self.partial_reuse_rate = partial_reuse_rate
        self.fail_if = fail_if
        self.device_reuse = device_reuse
        self.device: list[object] = [None] * device_blocks
        self.device_owner: list[int | None] = [None] * device_blocks
        self.free_device: list[int] = list(range(device_blocks))
        self.device_cache: dict[object, int] = {}  # identity -> freed device block still holding it
        self.slots: dict[str, dict[int, object]] = {"host": {}, "disk": {}}
        self.results: list[OpResult] = []
        self.requests: dict[int, SimRequest] = {}
        self.step_no = 0
        self.loads_checked = 0
        self.loads_from = {"host": 0, "disk": 0}
        self.first_config_seen = False
        self.ops_of: dict[int, set[int]] = {}
        self.delivered: set[int] = set()

    # --------------------------------------------------------------------------- identities
    def identity(self, req: SimRequest, block: int) -> object:
        return (req.salt, tuple(req.tokens[: (block + 1) * self.tpb]))

    def tier_of(self, route: Route, side: str) -> str:
        if route in (Route.D2H, Route.H2D):
            return "host"
        return "host" if side == "src" else "disk"

    # ------------------------------------------------------------------------------ stager
    def ready(self) -> bool:
        return True

    def stage(self, op: Op, timeout: float) -> list[OpResult]:
        """Stage disk slots into host slots now; a failed block leaves its host slot as it was."""
        bad = ()
        if self._fails(op):
            bad = tuple(sorted(self.rng.sample(range(op.num_blocks), self.rng.randint(1, op.num_blocks))))
        for i, (src, dst) in enumerate(zip(op.src.tolist(), op.dst.tolist())):
            if i not in bad:
                content = self.slots["disk"].get(src)
                assert content is not None, f"staged disk slot {src}, which holds nothing"
                self.slots["host"][dst] = content
        return [OpResult(op.op_id, not bad, num_bytes=(op.num_blocks - len(bad)) * 1000, seconds=1e-4,
                         error="injected staging failure" if bad else "", failed_blocks=bad)]

    # ------------------------------------------------------------------------------- device
    def _take_device(self, n: int) -> list[int] | None:
        if len(self.free_device) < n:
            return None
        out = [self.free_device.pop(0) for _ in range(n)]
        for b in out:
            content = self.device[b]
            if content is not None and self.device_cache.get(content) == b:
                del self.device_cache[content]
            self.device[b] = None
        return out

    def _release_device(self, req: SimRequest) -> None:
        for b in req.block_ids:
            self.device_owner[b] = None
            content = self.device[b]
            if isinstance(content, tuple) and content and content[0] != "taint":
                self.device_cache[content] = b
            self.free_device.append(b)
        req.block_ids = []

    # -------------------------------------------------------------------------------- steps
    def add(self, req: SimRequest) -> None:
        req.tokens = list(req.prompt)
        self.requests[req.rid] = req

    def _admit(self, req: SimRequest) -> bool:
        tpb = self.tpb
        n = len(req.prompt)
        need = -(-n // tpb)
        if len(self.free_device) < need:
            return False
        reuse = 0  # the engine's own prefix reuse, matched before it allocates
        while self.device_reuse and reuse < (n - 1) // tpb and self.identity(req, reuse) in self.device_cache:
            reuse += 1
        blocks = self._take_device(need)
        assert blocks is not None
        device_tokens = reuse * tpb
        if self.partial_reuse_rate and self.rng.random() < self.partial_reuse_rate and device_tokens + 1 < n:
            device_tokens += self.rng.randint(1, min(tpb - 1, n - 1 - device_tokens))
        m = self.bm.match(req.rid, req.prompt, device_tokens, scope=RequestScope(req.salt))
        assert m.num_tokens % tpb == 0
        assert m.num_tokens == (m.host_blocks + m.disk_blocks) * tpb
        if m.num_tokens:
            assert device_tokens % tpb == 0, "matched after a partial device reuse"
            assert device_tokens + m.num_tokens <= n - 1, "promised the whole prompt"
        for i, b in enumerate(blocks):
            self.device_owner[b] = req.rid
            if i < reuse:  # the engine's own prefix reuse (modelled as a copy)
                self.device[b] = self.identity(req, i)
        req.block_ids = blocks
        self.bm.allocated(req.rid, list(blocks))
        req.promised = m.num_tokens
        req.computed = device_tokens + m.num_tokens
        req.admitted_at = self.step_no
        req.sync_promise = m.num_tokens > 0
        req.state = "running"
        return True

    def _report(self, req: SimRequest) -> RequestData:
        prompt_len = len(req.prompt)
        if req.computed < prompt_len:
            scheduled = min(self.chunk, prompt_len - req.computed)
        else:
            scheduled = 1
        # the overlap scheduler reports a sampled token one step late
        known = len(req.tokens) - (1 if self.overlap and req.generated > 0 else 0)
        new_tokens = req.tokens[req.reported_tokens:known]
        req.reported_tokens = known
        new_blocks = req.block_ids[req.reported_blocks:]
        req.reported_blocks = len(req.block_ids)
        cp = req.computed
        if not req.first_reported and req.sync_promise:
            cp -= req.promised
        prios = [req.priority] * len(new_blocks) if req.priority is not None else None
        req.first_reported = True
        return RequestData(req.rid, new_tokens, new_blocks, cp, scheduled, prios)

    def _finish(self, req: SimRequest) -> None:
        first = self.bm.finish(req.rid)
        in_flight = self.ops_of.get(req.rid, set()) - self.delivered
        assert first == bool(in_flight), "finish must say whether an op of the request is still in flight"
        assert self.bm.finish(req.rid) in (first, False)
        self._release_device(req)
        req.state = "done"

    def step(self) -> StepOps:
        bm, tpb = self.bm, self.tpb
        # the connector's results arrive between steps, late and out of order
        self._deliver(self.deliver_rate)
        # finished loads give parked requests back; cancellations; admissions
        for req in self.requests.values():
            if req.state == "parked" and self.step_no > req.admitted_at:  # its loads ran last step
                req.state = "running"
        for req in list(self.requests.values()):
            if req.state in ("parked", "running") and req.cancel_after is not None \
                    and self.step_no - req.admitted_at >= req.cancel_after:
                self._finish(req)
            elif req.state in ("parked", "running") and req.rid in bm.failed_requests and self.rng.random() < 0.5:
                self._finish(req)
        for req in self.requests.values():
            if req.state == "waiting" and req.arrive <= self.step_no:
                if req.cancel_after == 0 and self.rng.random() < 0.5:  # cancelled while waiting for allocation
                    bm.match(req.rid, req.prompt, 0, scope=RequestScope(req.salt))
                    self._finish(req)
                    continue
                self._admit(req)
        running = [r for r in self.requests.values() if r.state == "running"]
        fresh = [r for r in running if not r.first_reported]
        seen = [r for r in running if r.first_reported]
        new = [self._report(r) for r in fresh]
        cached = [self._report(r) for r in seen]
        ops = bm.schedule(new, cached)
        for rid, op_id in zip(ops.request_ids.tolist(), ops.op_ids.tolist()):
            self.ops_of.setdefault(rid, set()).add(op_id)
        again = pickle.loads(pickle.dumps(ops))
        assert again == ops and again.step == ops.step
        assert (ops.worker_config is not None) == (not self.first_config_seen)
        self.first_config_seen = True
        assert np.all(np.diff(ops.op_ids) > 0)
        by_id = {r.rid: r for r in running}
        # loads run before the forward
        for op in ops.select(LOADS):
            self._run_load(op)
        # forward: every scheduled request computes its tokens
        for report in [*new, *cached]:
            req = by_id[report.request_id]
            start = req.computed
            end = start + report.num_scheduled_tokens
            for b in range(start // tpb, min(end // tpb, len(req.block_ids))):  # blocks this step fills
                self.device[req.block_ids[b]] = ("taint", req.rid, b) if req.tainted else self.identity(req, b)
            req.computed = end
        # stores run after the forward, then the background copies
        for op in ops.select(STORES):
            self._run_store(op)
        for op in ops.select(frozenset({Route.H2DISK})):
            self._run_h2disk(op)
        # sampling and decode bookkeeping
        for report in [*new, *cached]:
            req = by_id[report.request_id]
            if req.computed >= len(req.prompt) and req.state == "running":
                if req.generated >= req.gen:
                    self._finish(req)
                    continue
                token = (req.rid * 7919 + len(req.tokens) * 31) % 50_000
                req.tokens.append(token)
                req.generated += 1
                if len(req.tokens) > len(req.block_ids) * tpb:
                    extra = self._take_device(1)
                    if extra is None:
                        self._finish(req)  # out of device memory: the engine would fail the request
                        continue
                    self.device_owner[extra[0]] = req.rid
                    req.block_ids.extend(extra)
        bm.verify()
        self.step_no += 1
        return ops

    # ------------------------------------------------------------------------------ worker
    def _fails(self, op: Op) -> bool:
        if self.fail_if is not None and self.fail_if(op):
            return True
        return self.fail_rate > 0 and self.rng.random() < self.fail_rate

    def _run_load(self, op) -> None:
        tier = self.tier_of(op.route, "src")
        req = self.requests[op.request_id]
        if self._fails(op):
            bad = tuple(sorted(self.rng.sample(range(op.num_blocks), self.rng.randint(1, op.num_blocks))))
            req.tainted = True  # the engine computes on top of garbage until it learns of the failure
            self.results.append(OpResult(op.op_id, False, error="injected read failure", failed_blocks=bad))
            for dev in op.dst.tolist():
                self.device[dev] = ("taint", req.rid, -1)
        else:
            for slot, dev in zip(op.src.tolist(), op.dst.tolist()):
                assert self.device_owner[dev] == req.rid, "load into a block the request does not own"
                block = req.block_ids.index(dev)
                expected = self.identity(req, block)
                got = self.slots[tier].get(slot)
                assert got == expected, f"wrong KV: {tier} slot {slot} holds {got!r:.80}, block {block} needs {expected!r:.80}"
                self.device[dev] = got
                self.loads_checked += 1
                self.loads_from[tier] += 1
            self.results.append(OpResult(op.op_id, True, num_bytes=op.num_blocks * 1000, seconds=1e-4))

    def _run_store(self, op) -> None:
        tier = self.tier_of(op.route, "dst")
        for dev, slot in zip(op.src.tolist(), op.dst.tolist()):
            assert self.device_owner[dev] == op.request_id, "store from a block the request does not own"
            content = self.device[dev]
            assert content is not None, "store of a block the forward has not written"
            self.slots[tier][slot] = content
        ok = not self._fails(op)
        self.results.append(OpResult(op.op_id, ok, num_bytes=op.num_blocks * 1000, seconds=1e-4,
                                     error="" if ok else "injected write failure"))

    def _run_h2disk(self, op) -> None:
        for src, dst in zip(op.src.tolist(), op.dst.tolist()):
            content = self.slots["host"].get(src)
            assert content is not None
            self.slots["disk"][dst] = content
        ok = not self._fails(op)
        self.results.append(OpResult(op.op_id, ok, num_bytes=op.num_blocks * 1000, seconds=1e-4))

    def _deliver(self, rate: float) -> None:
        if not self.results:
            return
        self.rng.shuffle(self.results)
        cut = len(self.results) if rate >= 1 else self.rng.randint(0, int(len(self.results) * rate) + 1)
        now, self.results = self.results[:cut], self.results[cut:]
        self.delivered.update(r.op_id for r in now)
        self.bm.apply_results(now)
        self.bm.verify()

    # ------------------------------------------------------------------------------- drive
    def run(self, max_steps: int = 400) -> None:
        while self.step_no < max_steps and any(r.state != "done" for r in self.requests.values()):
            self.step()
        for req in self.requests.values():
            if req.state != "done":
                self._finish(req)
        self.drain()

    def drain(self) -> None:
        for _ in range(50):
            self._deliver(1.0)
            ops = self.bm.schedule([], [])
            for op in ops.select(frozenset({Route.H2DISK})):
                self._run_h2disk(op)
            assert not ops.select(LOADS) and not ops.select(STORES)
            self.bm.verify()
            if not self.results and self.bm.num_pending_ops == 0:
                break
        assert self.bm.num_pending_ops == 0, "an operation never reached its end"
        assert self.bm.num_requests == 0, "a finished request was never forgotten"
        for tier in (self.bm.host, self.bm.disk):
            if tier is not None:
                assert not tier.holds.any(), f"{tier.kind}: holds left after every request finished"
