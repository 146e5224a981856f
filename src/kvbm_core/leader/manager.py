"""The block manager: the leader's brain. It decides which block lives in which tier slot, what a new
request can skip, and what each step must load and store. Pure bookkeeping: no bytes, no torch.

The TRT-LLM connector calls, per request: :meth:`~BlockManager.match` (``get_num_new_matched_tokens``),
:meth:`~BlockManager.allocated` (``update_state_after_alloc``), :meth:`~BlockManager.finish`
(``request_finished``); per step :meth:`~BlockManager.schedule` (``build_connector_meta``); and
:meth:`~BlockManager.apply_results` with every rank's operation results. Every transfer is
two-phase: planned here (its slots protected: stores write ``WRITING`` slots, loads read ``HELD``
ones) and completed only once every rank reported it: it succeeded only if it succeeded on every
rank, and the blocks that failed on any rank count as failed.

Choices:

- **Matching.** After the device-reused prefix (which must be block-aligned, else nothing is
  matched: partial reuse), the contiguous run of blocks found in the host tier or, where the host
  lacks one, in the disk tier; it stops at the first block in neither. At most
  ``floor((prompt_len - 1) / tokens_per_block)`` blocks in total (device ones included) are
  promised, so the engine always computes at least one token. The run is then cut by the cost
  model (:mod:`~kvbm_core.leader.cost_model`).
- **Staging before promising.** Disk blocks of the run are read into host slots and verified on
  every rank *before* the answer (``DISK2H``, run at once through the stager the connector gives):
  a promise only ever covers host blocks. A block that fails verification on any rank is dropped
  from the disk and the promise stops before it (the engine computes it); a stager that is not
  ready (a rank not connected yet) or does not answer in time promises only what precedes the
  first disk block. So a promised load cannot fail for bad bytes, on any TensorRT-LLM line, and
  every load is synchronous (``load_async`` is always False): TensorRT-LLM has no way to take back
  a promise, and a request it failed would leave unloaded blocks in its own reuse tree.
- **Onboarding.** ``allocated`` pairs the promised blocks with the device ids from index
  ``device_blocks`` on; their ``H2D`` operation goes out in the next :meth:`schedule`. Promised
  slots are held until its result.
- **Offload.** Each step, every block that becomes full in that step's forward and was neither
  device-reused nor onboarded is a candidate (a per-request cursor). With
  ``host_offload_prefix_min_priority > 0`` only the leading run of candidates whose retention
  priority (``RequestData.priorities``, 35 where absent) reaches the threshold is offloaded, and
  offload stops for the rest of the request at the first lower one. Candidates go device -> host
  (write-through ``D2H``; a disk-only pipeline's host tier is its staging tier). A block whose key
  the host already holds or is writing is skipped (also when two requests of one step compute it).
  When the host is full of held or writing slots (promises, reads, blocks waiting to reach the
  disk), the leading candidates get the free slots and the others go straight to the disk
  (``D2DISK``), behind the disk admission filter: a host tier smaller than a prompt still puts the
  whole prefix on disk. Blocks are only hashed from tokens the engine reported, so a block
  whose last token is still unknown (overlap scheduler, draft tokens) waits for a later step. A
  request's first report must come in ``new_requests`` (it carries the whole prompt); a cached
  report of a request the leader has no first report for is never hashed or stored.
- **Host -> disk** runs in the background (``H2DISK``, :mod:`~kvbm_core.leader.disk_offload`), a
  bounded number of blocks in flight, behind the disk admission filter. A block is *offered* to the
  filter on every completed host store, on every skipped duplicate host store (the same block
  computed again) and on every host hit (match) - unless the disk already holds or writes it.
  Dynamo offers only re-registrations, so a block that is only ever read back from the host never
  reaches disk; here each read counts as a sighting.
- **Failures.** A failed operation is never counted as done. A failed store frees its slots. A
  failed load or staging drops the failing slots from the index (their bytes are bad;
  ``failed_blocks``, or all of the operation's slots when it names none); a failed load also marks
  the request failed (:attr:`BlockManager.failed_requests`); such a request plans no further
  stores. A store's result is applied only once every load of its request succeeded (until then
  it waits): KV computed on top of a failed load is never registered.
- **Finishing.** :meth:`finish` returns True iff any operation was ever planned for the request; the
  request is forgotten once all of them have results. Promises that never became loads are released.
- **Events**: every tier change and request milestone fires a registry hook (see
  :mod:`kvbm_core.hookspecs`): ``kvbm_blocks_stored``, ``kvbm_blocks_removed``,
  ``kvbm_blocks_onboarded``, ``kvbm_blocks_offloaded``, ``kvbm_request_matched``,
  ``kvbm_request_finished``, ``kvbm_transfer_failed``. (``kvbm_pipeline_built``/``_closed`` are the
  connector's to fire.)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import structlog

from kvbm_core.errors import KvbmError
from kvbm_core.identity import KeySpace, Namespace, RequestScope, dynamo_salt_hash, keys_array
from kvbm_core.layout import BlockLayout
from kvbm_core.leader.breaker import TierBreaker
from kvbm_core.leader.cost_model import CostModel, StepWork
from kvbm_core.leader.disk_offload import DiskOffloader
from kvbm_core.leader.invariants import check_invariants
from kvbm_core.leader.planned_op import PlannedOp
from kvbm_core.leader.request import RequestPhase, RequestSlot, RequestStateError
from kvbm_core.leader.slot_state import SlotState
from kvbm_core.leader.stats import LeaderStats, StatsBook
from kvbm_core.leader.tier_state import ABSENT, DEFAULT_PRIORITY, TierState
from kvbm_core.leader.tiers import build_tiers
from kvbm_core.link import LinkAddress
from kvbm_core.ops import DISK_ROUTES, LOADS, NO_REQUEST, STAGING, STORES, Op, OpResult, Route, StepOps, WorkerConfig
from kvbm_core.registry import Registry
from kvbm_core.settings.model import KvbmSettings

log = structlog.get_logger("kvbm.leader")

IN_HOST, IN_DISK, IN_NEITHER = 0, 1, -1
"""Where a matched block loads from, as an index into ``BlockManager._tiers`` (not a TierLevel)."""

MAX_SCOPES_CACHED = 4096
"""Request scopes (salt, adapter) whose key space is kept built; the cache starts over past this."""

MAX_FAILED_REMEMBERED = 65_536
"""How many failed request ids :attr:`BlockManager.failed_requests` keeps (oldest dropped first)."""

MAX_STEPS_REMEMBERED = 256
"""Steps whose forward-pass time may still arrive (rank 0 reports it a step or two later)."""


@dataclass(frozen=True)
class Match:
    """The answer to ``get_num_new_matched_tokens``: tokens promised, and where their blocks were
    found (``disk_blocks`` of them were staged into the host for this request)."""

    num_tokens: int
    host_blocks: int
    disk_blocks: int


NO_MATCH = Match(0, 0, 0)


class Stager(Protocol):
    """Runs a staging operation on every rank at once (the connector's workers, see :mod:`kvbm_core.link`)."""

    def ready(self) -> bool:
        """Whether every rank can be reached now."""

    def run(self, op: Op, timeout: float) -> list[OpResult]:
        """Every rank's result; raises (``TimeoutError``, ``LinkError``) when not all of them came."""

STAGING_TIMEOUT_FACTOR = 10.0
"""A staging operation may take this many times its predicted duration, and at least :data:`MIN_STAGING_S`."""
MIN_STAGING_S = 2.0
MAX_STAGING_S = 60.0


class RequestLike(Protocol):
    """What :meth:`BlockManager.schedule` reads of TRT-LLM's ``RequestData`` (``priorities`` optional)."""

    request_id: int
    new_tokens: Sequence[int]
    new_block_ids: Sequence[int]
    computed_position: int
    num_scheduled_tokens: int


class BlockManager:
    """The leader's block bookkeeping for one engine instance (see the module docstring)."""

    def __init__(self, settings: KvbmSettings, layout: BlockLayout, *, world_size: int, model_id: str,
                 registry: Registry, weights: str = "", clock: Callable[[], float] = time.monotonic,
                 link: LinkAddress | None = None, stager: Stager | None = None, host_grows: bool = False,
                 engine_capacity: tuple[int, int] | None = None) -> None:
        self.settings = settings
        self.layout = layout
        self.world_size = world_size
        self.model_id = model_id
        self.registry = registry
        self.clock = clock
        self.tokens_per_block = layout.tokens_per_block
        self.namespace = Namespace.from_layout(layout, model_id, world_size, weights=weights)
        tiers = build_tiers(settings, layout, world_size, registry, clock, host_grows)
        self._ready: dict[str, dict[int, int]] = {}  # host tier kind -> rank -> slots it reported usable
        self.host: TierState | None = tiers.host
        self.disk: TierState | None = tiers.disk
        self.plan = tiers.plan
        self._tiers = (self.host, self.disk)
        self._kinds = tuple(t.kind if t is not None else "" for t in self._tiers)
        self._to_disk = DiskOffloader(self.host, self.disk, tiers.disk_filter) \
            if self.host is not None and self.disk is not None else None
        self.disk_breaker = TierBreaker(self.disk.kind, clock, self._disk_service_changed) \
            if self.disk is not None else None
        self.worker_config = WorkerConfig(settings, tiers.allocations, self.namespace.digest, world_size, link)
        self._cost = CostModel(settings.cost_model, layout.bytes_per_block, layout.tokens_per_block, tiers.read_gbps,
                               host_kind=self.host.kind if self.host is not None else None,
                               capacity=engine_capacity)
        self._work: OrderedDict[int, StepWork] = OrderedDict()  # step -> what it computed, until timed
        self._stager = stager
        self._min_priority = settings.host_offload_prefix_min_priority
        self._spaces: dict[RequestScope, tuple[KeySpace, int]] = {}
        self._requests: dict[int, RequestSlot] = {}
        self._ops: dict[int, PlannedOp] = {}
        self._partial: dict[int, dict[int, OpResult]] = {}  # op id -> rank -> result, until all ranks report
        self._next_op_id = 1
        self._step = 0
        self._config_sent = False
        self._to_onboard: dict[int, None] = {}
        self._failed: OrderedDict[int, None] = OrderedDict()
        self._stats = StatsBook(settings.cache_stats.max_requests)

    # ================================================================================ queries
    @property
    def stats(self) -> LeaderStats:
        return self._stats.snapshot()

    @property
    def failed_requests(self) -> set[int]:
        """Requests whose promised load failed (the most recent :data:`MAX_FAILED_REMEMBERED`)."""
        return set(self._failed)

    def request_ops(self, request_id: int) -> set[int]:
        """Every op id planned for the request while the leader still tracks it."""
        req = self._requests.get(request_id)
        return set(req.ops) if req is not None else set()

    @property
    def num_pending_ops(self) -> int:
        """Operations planned and not yet reported."""
        return len(self._ops)

    @property
    def num_requests(self) -> int:
        """Requests the leader still tracks (unfinished, or finished with operations in flight)."""
        return len(self._requests)

    def bandwidth_gbps(self, kind: str) -> float:
        """The cost model's current onboard bandwidth estimate for a tier kind."""
        return self._cost.bandwidth_gbps(kind)

    # ================================================================================= match
    def match(self, request_id: int, tokens: Sequence[int], num_device_tokens: int, *,
              scope: RequestScope | None = None) -> Match:
        """How many prompt tokens after the device prefix the tiers can provide; pins them."""
        req = self._requests.get(request_id)
        if req is not None:
            self._forget_unstarted(req)
        req = RequestSlot(request_id)
        req.move(RequestPhase.MATCHED)
        space, salt_hash = self._key_space(scope or RequestScope())
        req.start_hashing(space, tokens, salt_hash)
        req.prompt = tokens
        self._requests[request_id] = req
        assert req.hasher is not None
        num_tokens = req.hasher.num_tokens
        req.device_blocks = req.evaluated = num_device_tokens // self.tokens_per_block
        result = self._lookup(req, num_tokens, num_device_tokens)
        self._stats.requested_tokens += num_tokens
        self._stats.matched_tokens += result.num_tokens
        tpb = self.tokens_per_block
        self.registry.notify("kvbm_request_matched", request_id=request_id, requested_tokens=num_tokens,
                             device_tokens=num_device_tokens, host_tokens=result.host_blocks * tpb,
                             disk_tokens=result.disk_blocks * tpb)
        return result

    def observe_forward(self, step: int, seconds: float) -> None:
        """Rank 0 timed step ``step``'s forward pass: the cost model learns the engine's prefill speed
        from it (from steps that loaded nothing) and how busy the engine is."""
        work = self._work.pop(step, None)
        if work is not None:
            self._cost.observe_step(work.tokens, work.position_sum, work.requests, None if work.loads else seconds)

    def tier_ready(self, rank: int, kind: str, slots: int) -> None:
        """Rank ``rank``'s ``kind`` tier can use its first ``slots`` slots: the leader uses as many as
        every rank that reported can. A rank not heard from yet does not hold the others back (ranks
        in other processes build their tiers at the first step, after it is planned): it allocates
        the same tier, and an operation on a slot it cannot use yet fails there and is dropped on
        every rank, never served."""
        tier = self.host
        if tier is None or tier.kind != kind:
            return
        ready = self._ready.setdefault(kind, {})
        ready[rank] = max(ready.get(rank, 0), min(int(slots), tier.num_slots))
        if min(ready.values()) > tier.usable:
            tier.grow(min(ready.values()))

    def _disk_in_service(self) -> bool:
        return self.disk_breaker is not None and self.disk_breaker.allows()

    def _disk_service_changed(self, tier: str, in_service: bool, error: str) -> None:
        if not in_service and self._to_disk is not None:
            self._to_disk.drop_queue()  # its host slots would otherwise stay held until the disk returns
        self.registry.notify("kvbm_tier_service_changed", tier=tier, in_service=in_service, error=error)

    def _lookup(self, req: RequestSlot, num_tokens: int, num_device_tokens: int) -> Match:
        tpb = self.tokens_per_block
        host, disk = self.host, self.disk if self._disk_in_service() else None
        if num_device_tokens % tpb or host is None:
            return NO_MATCH
        limit = (num_tokens - 1) // tpb
        start = req.device_blocks
        if start >= limit:
            return NO_MATCH
        req.looked_up = True
        req.queried = limit - start
        assert req.hasher is not None
        keys = req.hasher.keys(limit, start)
        n = len(keys)
        # Where each block is: the host when it holds it, else the disk; the run ends at the first
        # block in neither (a cold prompt whose first block misses and no disk can fill in: none).
        if disk is not None or host.matchable(host.lookup(keys[:1]))[0]:
            slots = host.lookup(keys)
            in_host = host.matchable(slots)
        else:
            slots, in_host = np.full(n, ABSENT, np.int64), np.zeros(n, bool)
        if in_host.all():  # the common case of a host hit: one tier, no per-block choice
            k = self._cost.best_run(n, self._kinds[IN_HOST], start)
            if k == 0:
                self._declined(req, {self._kinds[IN_HOST]: n})
                return NO_MATCH
            return self._promise(req, keys[:k], slots[:k], 0)
        codes = np.full(n, IN_NEITHER, np.int8)
        codes[in_host] = IN_HOST
        if disk is not None:
            rest = np.flatnonzero(~in_host)
            found = disk.lookup(keys[rest])
            ok = disk.matchable(found)
            codes[rest[ok]] = IN_DISK
            slots[rest[ok]] = found[ok]
        misses = np.flatnonzero(codes == IN_NEITHER)
        run = int(misses[0]) if len(misses) else n
        k = self._cost.best_prefix(codes[:run], self._kinds, start)
        if k < run:
            dropped = codes[k:run]
            self._declined(req, {self._kinds[code]: int(np.count_nonzero(dropped == code))
                                 for code in (IN_HOST, IN_DISK)})
        if k == 0:
            return NO_MATCH
        codes, slots, keys = codes[:k], slots[:k].copy(), keys[:k]
        from_host = codes == IN_HOST
        host.hold(slots[from_host])  # before staging picks victims: the run's host blocks stay put
        k, staged = self._stage(req, keys, codes, slots)
        if k < len(slots):
            host.release(slots[k:][from_host[k:]])
        if k == 0:
            return NO_MATCH
        return self._promise(req, keys[:k], slots[:k], staged, held=True)

    def _declined(self, req: RequestSlot, counts: dict[str, int]) -> None:
        """Matched blocks the cost model did not promise: loading them was predicted slower than
        recomputing them."""
        for kind, n in counts.items():
            if n:
                self._stats.declined[kind] = self._stats.declined.get(kind, 0) + n
                self.registry.notify("kvbm_blocks_declined", tier=kind, request_id=req.request_id, num_blocks=n)
        log.debug("matched blocks declined: slower to load than to recompute", request_id=req.request_id,
                  declined=counts, prefill_tokens_per_s=round(self._cost.prefill.tokens_per_s),
                  busy_weight=round(self._cost.busy_weight, 2))

    def _promise(self, req: RequestSlot, keys: np.ndarray, slots: np.ndarray, staged: int, *,
                 held: bool = False) -> Match:
        """Promise the host blocks ``slots`` (``staged`` of them just staged from disk)."""
        k = len(slots)
        if not held:
            self.host.hold(slots)  # type: ignore[union-attr]
        req.promised_slots = slots
        req.host_hits, req.disk_hits = k - staged, staged
        req.evaluated = req.device_blocks + k
        self._offer_for_disk(keys)
        return Match(k * self.tokens_per_block, k - staged, staged)

    def _stage(self, req: RequestSlot, keys: np.ndarray, codes: np.ndarray, slots: np.ndarray) -> tuple[int, int]:
        """Stage the run's disk blocks into host slots on every rank, now; replaces their entries of
        ``slots`` (held) by the host slots. Returns how many leading blocks are now in the host, held,
        and how many of those were staged."""
        host, disk = self.host, self.disk
        assert host is not None
        on_disk = np.flatnonzero(codes == IN_DISK)
        if not len(on_disk):
            return len(slots), 0
        if disk is None or self._stager is None or not self._stager.ready():
            return int(on_disk[0]), 0
        all_on_disk = on_disk
        writing = host.lookup(keys[on_disk]) != ABSENT  # being stored to the host right now
        if writing.any():
            on_disk = on_disk[: int(np.argmax(writing))]
        targets, ev_keys, ev_seq = host.allocate(len(on_disk))
        self._removed(host, ev_keys, ev_seq)
        on_disk = on_disk[: len(targets)]
        cut = int(all_on_disk[len(on_disk)]) if len(on_disk) < len(all_on_disk) else len(slots)  # first not staged
        if not len(on_disk):
            return cut, 0
        sources = slots[on_disk]
        disk.hold(sources)
        host.begin_write(targets, keys[on_disk], disk.seq[sources], disk.priority[sources])
        op = self._new_op(Route.DISK2H, None, sources, targets, keys[on_disk], disk.seq[sources].copy(), disk)
        predicted = self._cost.load_seconds({disk.kind: len(on_disk)})
        timeout = min(MAX_STAGING_S, max(MIN_STAGING_S, STAGING_TIMEOUT_FACTOR * predicted))
        view = Op(op.op_id, op.route, op.request_id, op.src, op.dst, op.keys)
        try:
            self.apply_results(self._stager.run(view, timeout))
        except Exception as exc:  # not every rank answered: the op completes when they do
            log.warning("staging disk blocks did not finish in time; not promised", op_id=op.op_id,
                        blocks=len(on_disk), error=str(exc))
            return int(on_disk[0]), 0
        ready = host.state[targets] == SlotState.READY
        good = int(np.argmin(ready)) if not ready.all() else len(on_disk)
        host.hold(targets[:good])
        slots[on_disk[:good]] = targets[:good]
        end = cut if good == len(on_disk) else int(on_disk[good])
        return end, good
    def _key_space(self, scope: RequestScope) -> tuple[KeySpace, int]:
        """The key space of ``scope`` and its Dynamo salt hash (for KV events), built once per scope."""
        found = self._spaces.get(scope)
        if found is None:
            if len(self._spaces) >= MAX_SCOPES_CACHED:
                self._spaces.clear()
            found = self._spaces[scope] = (self.namespace.key_space(scope), dynamo_salt_hash(scope.salt_text))
        return found

    # ============================================================================= allocated
    def allocated(self, request_id: int, block_ids: Sequence[int]) -> None:
        """The engine allocated the request's prompt blocks (all of them, in prompt order)."""
        req = self._requests.get(request_id)
        if req is None:
            req = self._requests[request_id] = RequestSlot(request_id)
        if req.phase is RequestPhase.FINISHED:
            return
        req.move(RequestPhase.ALLOCATED)
        req.block_ids = list(block_ids)
        if req.num_promised:
            if len(req.block_ids) < req.promise_end_block:
                self._release_promise(req)
                self._fail(req, f"engine allocated {len(req.block_ids)} blocks, fewer than the "
                                f"{req.promise_end_block} the promise covers")
            else:
                self._to_onboard[request_id] = None

    # ============================================================================== schedule
    def schedule(self, new_requests: Sequence[RequestLike], cached_requests: Sequence[RequestLike], *,
                 fresh_blocks: Sequence[int] = ()) -> StepOps:
        """One step's operations: onboards of newly allocated requests, stores of blocks this step
        fills, and background host -> disk offloads. ``fresh_blocks``: the device blocks the engine
        handed out in this step (every request's ``new_block_ids``), passed on to the workers."""
        planned: list[PlannedOp] = []
        self._emit_onboards(planned)
        loads = bool(planned)
        candidates: list[tuple[RequestSlot, int, int]] = []
        requests, tpb, finished = self._requests, self.tokens_per_block, RequestPhase.FINISHED
        work = StepWork(len(new_requests) + len(cached_requests))
        for reports, first in ((new_requests, True), (cached_requests, False)):
            for report in reports:  # the common case (a running request, one new token) stays inline
                work.add(report.computed_position, report.num_scheduled_tokens)
                req = requests.get(report.request_id)
                if req is None or not req.reported:
                    if not first:  # its deltas cannot be placed: never hash (or store) them
                        self._unplaceable(report, req)
                        continue
                    req, start = self._first_report(report, req)
                    if req is None:
                        continue
                elif req.phase is finished:
                    continue
                else:
                    tokens = report.new_tokens
                    if type(tokens) is list:
                        req.hasher.tokens.fromlist(tokens)  # type: ignore[union-attr]
                    elif len(tokens):
                        req.hasher.append(tokens)  # type: ignore[union-attr]
                    block_ids = report.new_block_ids
                    if len(block_ids):
                        self._more_blocks(req, block_ids, getattr(report, "priorities", None))
                    start = report.computed_position
                full = (start + report.num_scheduled_tokens) // tpb
                low = req.evaluated
                if full <= low:
                    continue
                # blocks are only hashed from reported tokens, and need a device block id
                full = min(full, len(req.hasher.tokens) // tpb, len(req.block_ids))  # type: ignore[union-attr]
                if full <= low:
                    continue
                req.evaluated = full
                if not (req.failed or req.offload_stopped or self.host is None):
                    candidates.append((req, low, full))
        if candidates:
            self._plan_stores(candidates, planned)
        self._plan_disk_offloads(planned)
        config = None
        if not self._config_sent:
            config, self._config_sent = self.worker_config, True
        step = self._step
        self._step += 1
        work.loads = loads
        self._work[step] = work
        while len(self._work) > MAX_STEPS_REMEMBERED:
            self._work.popitem(last=False)
        return StepOps.build(step, [(op.op_id, op.route, op.request_id, op.src, op.dst, op.keys) for op in planned],
                             worker_config=config, fresh_blocks=np.asarray(fresh_blocks, np.int64))

    def _emit_onboards(self, planned: list[PlannedOp]) -> None:
        for request_id in self._to_onboard:
            req = self._requests.get(request_id)
            if req is None or req.phase is RequestPhase.FINISHED or req.loads_emitted or not req.num_promised:
                continue
            host = self.host
            assert host is not None and req.hasher is not None
            if (host.state[req.promised_slots] == SlotState.DOOMED).any():
                self._release_promise(req)
                self._fail(req, "a promised block was found bad before its load")
                continue
            lo, hi = req.device_blocks, req.promise_end_block
            req.loads_emitted = True
            op = self._new_op(Route.H2D, req, req.promised_slots, np.asarray(req.block_ids[lo:hi], np.int64),
                              req.hasher.keys(hi, lo), np.zeros(hi - lo, np.uint64), host)
            req.pending_loads.add(op.op_id)
            planned.append(op)
            if req.phase is RequestPhase.ALLOCATED:
                req.move(RequestPhase.ACTIVE)
        self._to_onboard.clear()

    def _first_report(self, report: RequestLike, req: RequestSlot | None) -> tuple[RequestSlot | None, int]:
        """A request's first scheduler-output entry: the whole prompt and all its prompt blocks.

        Returns the request (None when it already finished) and the first computed position of
        this step's forward: the device prefix plus the promised tokens for a synchronous load (the
        engine subtracts them from ``computed_position`` in this one report), the reported position
        otherwise (an asynchronously loaded request reports with its loaded tokens included).
        """
        request_id = report.request_id
        if req is None:
            req = self._requests[request_id] = RequestSlot(request_id)
        if req.phase is RequestPhase.FINISHED:
            return None, 0
        if req.hasher is None:  # never matched (e.g. block reuse off): the report tells the salt, if any
            scope = RequestScope(getattr(report, "cache_salt", None), getattr(report, "cache_salt_id", None))
            space, salt_hash = self._key_space(scope)
            req.start_hashing(space, (), salt_hash)
        hasher = req.hasher
        assert hasher is not None
        tokens, block_ids = report.new_tokens, report.new_block_ids
        req.reported = True
        if req.phase is not RequestPhase.ACTIVE:
            req.move(RequestPhase.ACTIVE)
        if req.prompt is not None:  # matched: the first report must carry the prompt it matched
            extra = self._check_prompt(req, tokens)
            if extra is not None and len(extra):
                hasher.append(extra)
        else:
            hasher.append(tokens)
        if len(block_ids):
            ids = list(block_ids)
            lo, hi = req.device_blocks, req.promise_end_block
            if req.loads_emitted and ids[lo:hi] != req.block_ids[lo:hi]:
                self._fail(req, "the first report's block ids differ from the allocated ones")
            req.block_ids = ids
            priorities = getattr(report, "priorities", None)
            req.priorities = list(priorities) if priorities is not None else []
        tpb = self.tokens_per_block
        start = report.computed_position
        if req.num_promised and not req.failed:
            start = max(start, req.promise_end_block * tpb)
        req.evaluated = max(req.evaluated, start // tpb)
        return req, start

    def _unplaceable(self, report: RequestLike, req: RequestSlot | None) -> None:
        """A cached-request report for a request whose first report the leader never saw (or that
        it already forgot): its tokens are a delta of an unknown prefix, so nothing of it is hashed
        or stored; with a promise pending, the request cannot be trusted either."""
        log.warning("scheduler output for a request without a first report; not offloaded",
                    request_id=report.request_id)
        if req is not None and req.phase is not RequestPhase.FINISHED:
            req.offload_stopped = True
            if req.num_promised:
                self._fail(req, "reported as cached before its first report")

    def _more_blocks(self, req: RequestSlot, block_ids: Sequence[int], priorities: Sequence[int] | None) -> None:
        """Device blocks appended in decode (or later chunks), with their retention priorities."""
        if len(req.priorities) < len(req.block_ids):
            req.priorities.extend([DEFAULT_PRIORITY] * (len(req.block_ids) - len(req.priorities)))
        req.block_ids.extend(block_ids)
        if priorities is not None:
            req.priorities.extend(priorities)

    def _check_prompt(self, req: RequestSlot, tokens: Sequence[int]) -> Sequence[int] | None:
        """Tokens past the matched prompt, or None after failing the request on a mismatch."""
        prompt = req.prompt
        assert prompt is not None
        req.prompt = None
        n = len(prompt)
        if tokens is prompt:
            return ()
        head = tokens[:n]
        same = len(tokens) >= n and (
            head == prompt if isinstance(head, list) and isinstance(prompt, list)
            else np.array_equal(np.asarray(head), np.asarray(prompt))
        )
        if not same:
            self._fail(req, "the engine reported other prompt tokens than it matched")
            return None
        return tokens[n:]

    # ---------------------------------------------------------------------------------- stores
    def _plan_stores(self, candidates: list[tuple[RequestSlot, int, int]], planned: list[PlannedOp]) -> None:
        """Claim target slots for this step's candidate blocks and emit one store per request.

        The batch is assembled with Python lists and converted once: a decode step has a few
        single-block candidates, where per-request numpy calls would dominate.
        """
        target = self.host
        assert target is not None
        owners: list[RequestSlot] = []
        bounds = [0]  # candidates of owners[i] are rows bounds[i]:bounds[i+1] of the batch
        key_parts: list[bytes] = []
        seq_parts: list[bytes] = []
        device: list[int] = []
        priority: list[int] = []
        threshold = self._min_priority
        for req, lo, hi in candidates:
            prio = req.priorities[lo:hi]
            if len(prio) < hi - lo:
                prio = prio + [DEFAULT_PRIORITY] * (hi - lo - len(prio))
            if threshold > 0:
                cut = next((i for i, p in enumerate(prio) if p < threshold), None)
                if cut is not None:  # offload only the leading run at or above the threshold
                    req.offload_stopped = True
                    hi, prio = lo + cut, prio[:cut]
            if hi <= lo:
                continue
            assert req.hasher is not None
            key_parts.append(req.hasher.key_bytes(lo, hi))
            seq_parts.append(req.seq_hash_bytes(lo, hi))
            device.extend(req.block_ids[lo:hi])
            priority.extend(prio)
            owners.append(req)
            bounds.append(bounds[-1] + hi - lo)
        if not owners:
            return
        keys = keys_array(b"".join(key_parts))
        seq = np.frombuffer(b"".join(seq_parts), np.uint64)
        device_ids = np.array(device, np.int64)
        existing = target.lookup(keys)
        fresh = existing == ABSENT
        if len(owners) > 1:  # the same block computed by two requests of this step: store it once
            once = _first_occurrences(keys[:, 0])
            duplicate = (existing >= 0) | (fresh & ~once)
            fresh &= once
        else:
            duplicate = existing >= 0
        rows = np.flatnonzero(fresh)
        slots, ev_keys, ev_seq = target.allocate(len(rows))
        self._removed(target, ev_keys, ev_seq)
        overflow = rows[len(slots):]  # the host has no room for these now
        rows = rows[: len(slots)]
        prio = np.array(priority, np.int16)
        self._emit_stores(Route.D2H, target, owners, bounds, rows, slots, keys, seq, prio, device_ids, planned)
        if len(overflow) and self._disk_in_service():
            self._store_to_disk(owners, bounds, overflow, keys, seq, prio, device_ids, planned)
        if duplicate.any():
            self._offer_for_disk(keys[duplicate])

    def _store_to_disk(self, owners: list[RequestSlot], bounds: list[int], rows: np.ndarray, keys: np.ndarray,
                       seq: np.ndarray, priority: np.ndarray, device_ids: np.ndarray, planned: list[PlannedOp]) -> None:
        """Blocks the host has no room for go straight to the disk, if it admits them and has room."""
        disk = self.disk
        assert disk is not None
        rows = rows[disk.lookup(keys[rows]) == ABSENT]
        admission = self._to_disk.admission if self._to_disk is not None else None
        if len(rows) and admission is not None:
            rows = rows[np.asarray(admission.admit(keys[rows]), bool)]
        if not len(rows):
            return
        slots, ev_keys, ev_seq = disk.allocate(len(rows))
        self._removed(disk, ev_keys, ev_seq)
        self._emit_stores(Route.D2DISK, disk, owners, bounds, rows[: len(slots)], slots, keys, seq, priority,
                          device_ids, planned)

    def _emit_stores(self, route: Route, target: TierState, owners: list[RequestSlot], bounds: list[int],
                     rows: np.ndarray, slots: np.ndarray, keys: np.ndarray, seq: np.ndarray, priority: np.ndarray,
                     device_ids: np.ndarray, planned: list[PlannedOp]) -> None:
        """Claim ``slots`` of ``target`` for the batch ``rows`` and emit one store per request."""
        if not len(rows):
            return
        target.begin_write(slots, keys[rows], seq[rows], priority[rows])
        cuts = np.searchsorted(rows, bounds).tolist()
        for i, req in enumerate(owners):
            a, b = cuts[i], cuts[i + 1]
            if a == b:
                continue
            lo, hi = bounds[i], bounds[i + 1]
            r = slice(lo, hi) if b - a == hi - lo else rows[a:b]  # all of them: a plain slice
            planned.append(self._new_op(route, req, device_ids[r], slots[a:b], keys[r], seq[r], target))

    # -------------------------------------------------------------------------- host -> disk
    def _offer_for_disk(self, keys: np.ndarray) -> None:
        if self._to_disk is not None and self._disk_in_service():
            self._to_disk.offer(keys)

    def _plan_disk_offloads(self, planned: list[PlannedOp]) -> None:
        if self._to_disk is None or not self._disk_in_service():
            return
        if (claimed := self._to_disk.plan(self._removed)) is None:
            return
        src, dst, keys, seq = claimed
        planned.append(self._new_op(Route.H2DISK, None, src, dst, keys, seq, self._to_disk.host))

    def _new_op(self, route: Route, req: RequestSlot | None, src: np.ndarray, dst: np.ndarray, keys: np.ndarray,
                seq: np.ndarray, tier: TierState) -> PlannedOp:
        op_id = self._next_op_id
        self._next_op_id += 1
        op = PlannedOp(op_id, route, req.request_id if req is not None else NO_REQUEST,
                       np.asarray(src, np.int64), np.asarray(dst, np.int64), np.ascontiguousarray(keys, np.uint64),
                       seq, tier)
        self._ops[op_id] = op
        if req is not None:
            req.ops.add(op_id)
            req.pending.add(op_id)
        return op

    # ============================================================================== results
    def apply_results(self, results: Sequence[OpResult]) -> None:
        """Complete (or fail) operations once every rank reported them; unknown op ids are logged and ignored."""
        for rank_result in results:
            if rank_result.op_id not in self._ops:
                log.warning("result for an operation that is not pending", op_id=rank_result.op_id)
                continue
            result = self._gather(rank_result)
            if result is None:
                continue
            op = self._ops.pop(result.op_id)
            req = self._requests.get(op.request_id) if op.request_id != NO_REQUEST else None
            failed = (not result.ok) or bool(result.failed_blocks)
            if failed:
                self._stats.failed_ops += 1
                log.warning("operation failed", op_id=op.op_id, route=op.route.label, request_id=op.request_id,
                            error=result.error)
                self.registry.notify("kvbm_transfer_failed", route=op.route.label, op_id=op.op_id,
                                     request_id=op.request_id, error=result.error or "failed")
            if op.route in DISK_ROUTES and self.disk_breaker is not None:
                self.disk_breaker.record(not failed, result.device_failed, result.error)
            if op.route in STORES:
                if req is not None and req.pending_loads and not failed:
                    req.deferred.append((op, result))  # applied once the request's loads are through
                    continue
                self._finish_store(op, result, failed or (req is not None and req.failed))
            elif op.route in LOADS:
                self._finish_load(op, result, failed, req)
            elif op.route in STAGING:
                self._finish_staging(op, result, failed)
            else:
                self._finish_disk_offload(op, result, failed)
            if req is not None:
                req.pending.discard(op.op_id)
                self._forget_if_done(req)

    def _gather(self, result: OpResult) -> OpResult | None:
        """Every rank's result for one operation, merged; ``None`` until the last rank reported."""
        if self.world_size == 1:
            return result
        parts = self._partial.setdefault(result.op_id, {})
        parts[result.rank] = result
        if len(parts) < self.world_size:
            return None
        del self._partial[result.op_id]
        slowest = max(parts.values(), key=lambda r: r.seconds)
        failed = [r for r in parts.values() if not r.ok]
        errors = "; ".join(f"rank {r.rank}: {r.error}" for r in sorted(failed, key=lambda r: r.rank) if r.error)
        if any(not r.failed_blocks for r in failed):  # a rank that names no block failed them all
            bad: tuple[int, ...] = ()
        else:
            bad = tuple(sorted({b for r in failed for b in r.failed_blocks}))
        return replace(slowest, ok=not failed, rank=-1, error=errors, failed_blocks=bad,
                       device_failed=any(r.device_failed for r in parts.values()))

    def _finish_store(self, op: PlannedOp, result: OpResult, discard: bool) -> None:
        tier = op.tier
        if discard:
            tier.abort_write(op.dst)
            return
        tier.complete_write(op.dst)
        n = len(op.dst)
        self._stats.blocks[op.route] += n
        self.registry.notify("kvbm_blocks_stored", tier=tier.kind, route=op.route.label, keys=op.keys, seq_hashes=op.seq)
        self.registry.notify("kvbm_blocks_offloaded", route=op.route.label, num_blocks=n, num_bytes=result.num_bytes,
                             seconds=result.seconds)
        if tier is self.host:
            self._offer_for_disk(op.keys)

    def _finish_load(self, op: PlannedOp, result: OpResult, failed: bool, req: RequestSlot | None) -> None:
        tier = op.tier
        n = len(op.src)
        if failed:
            bad = np.asarray(result.failed_blocks, np.int64) if result.failed_blocks else np.arange(n)
            bad = np.unique(bad[(bad >= 0) & (bad < n)])
            self._removed(tier, *tier.invalidate(op.src[bad]))
            tier.release(op.src)
            if req is not None:
                self._fail(req, f"{op.route.label} load failed: {result.error or 'bad blocks'}")
        else:
            tier.release(op.src)
            self._stats.blocks[op.route] += n
            self._cost.observe(tier.kind, result.num_bytes, result.seconds)
            staged = min(req.disk_hits, n) if req is not None else 0  # the disk blocks it staged for this load
            for kind, count in ((tier.kind, n - staged), (self.disk.kind if self.disk else "", staged)):
                if count:
                    self.registry.notify("kvbm_blocks_onboarded", tier=kind, request_id=op.request_id,
                                         num_blocks=count, num_bytes=result.num_bytes * count // n,
                                         seconds=result.seconds * count / n)
        if req is not None:
            req.pending_loads.discard(op.op_id)
            if not req.pending_loads and req.deferred:
                deferred, req.deferred = req.deferred, []
                for store, store_result in deferred:
                    self._finish_store(store, store_result, req.failed)
                    req.pending.discard(store.op_id)

    def _finish_staging(self, op: PlannedOp, result: OpResult, failed: bool) -> None:
        """Disk blocks staged into host slots: the verified ones become host blocks; a block that
        failed on any rank leaves the disk (its bytes are bad) and its host slot is freed."""
        disk, host = op.tier, self.host
        assert host is not None
        n = len(op.src)
        bad = np.zeros(n, bool)
        if failed:
            named = np.asarray(result.failed_blocks, np.int64)
            bad[named[(named >= 0) & (named < n)] if len(named) else slice(None)] = True
        if bad.any():
            self._removed(disk, *disk.invalidate(op.src[bad]))
            host.abort_write(op.dst[bad])
        disk.release(op.src)
        good = ~bad
        if good.any():
            host.complete_write(op.dst[good])
            self._stats.blocks[Route.DISK2H] += int(np.count_nonzero(good))
            self._cost.observe(disk.kind, result.num_bytes, result.seconds)
            self.registry.notify("kvbm_blocks_stored", tier=host.kind, route=Route.DISK2H.label,
                                 keys=op.keys[good], seq_hashes=op.seq[good])

    def _finish_disk_offload(self, op: PlannedOp, result: OpResult, failed: bool) -> None:
        assert self._to_disk is not None
        kept = self._to_disk.done(op.src, op.dst, failed)
        n = int(np.count_nonzero(kept))
        if not n:
            return
        self._stats.blocks[Route.H2DISK] += n
        self.registry.notify("kvbm_blocks_stored", tier=self._to_disk.disk.kind, route=Route.H2DISK.label,
                             keys=op.keys[kept], seq_hashes=op.seq[kept])
        self.registry.notify("kvbm_blocks_offloaded", route=Route.H2DISK.label, num_blocks=n,
                             num_bytes=result.num_bytes, seconds=result.seconds)

    # =============================================================================== finish
    def finish(self, request_id: int) -> bool:
        """The request finished or was cancelled. True iff an operation of it has no result yet."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        if req.phase is RequestPhase.FINISHED:
            return bool(req.pending)
        if not req.loads_emitted:
            self._release_promise(req)
        self._to_onboard.pop(request_id, None)
        if req.looked_up:
            self._stats.window.add(req.queried, req.host_hits, req.disk_hits)
        self.registry.notify("kvbm_request_finished", request_id=request_id, queried_blocks=req.queried,
                             host_hit_blocks=req.host_hits, disk_hit_blocks=req.disk_hits)
        req.move(RequestPhase.FINISHED)
        self._forget_if_done(req)
        return bool(req.pending)

    def _forget_if_done(self, req: RequestSlot) -> None:
        if req.phase is RequestPhase.FINISHED and not req.pending and self._requests.get(req.request_id) is req:
            del self._requests[req.request_id]

    def _forget_unstarted(self, req: RequestSlot) -> None:
        """``match`` again for a known request: allowed only before any operation was planned."""
        if req.ops or req.phase not in (RequestPhase.MATCHED, RequestPhase.ALLOCATED, RequestPhase.FINISHED):
            raise RequestStateError(req.request_id, f"matched again while {req.phase.value if req.phase else 'new'}"
                                                    " with operations planned")
        if not req.loads_emitted:
            self._release_promise(req)
        self._to_onboard.pop(req.request_id, None)
        del self._requests[req.request_id]

    def _release_promise(self, req: RequestSlot) -> None:
        """Let go of promised slots that never became loads."""
        if req.loads_emitted or not req.num_promised:
            return
        self.host.release(req.promised_slots)  # type: ignore[union-attr]
        req.promised_slots = np.zeros(0, np.int64)

    def _fail(self, req: RequestSlot, reason: str) -> None:
        if not req.failed:
            log.warning("request failed", request_id=req.request_id, reason=reason)
        req.failed = True
        self._failed[req.request_id] = None
        self._failed.move_to_end(req.request_id)
        while len(self._failed) > MAX_FAILED_REMEMBERED:
            self._failed.popitem(last=False)

    def _removed(self, tier: TierState, keys: np.ndarray, seq: np.ndarray) -> None:
        if len(keys):
            self.registry.notify("kvbm_blocks_removed", tier=tier.kind, keys=keys, seq_hashes=seq)

    # ============================================================================== restart
    def recovered(self, kind: str, slots: np.ndarray, keys: np.ndarray) -> None:
        """Blocks a restarted tier found valid at start become matchable (slots in use are skipped)."""
        tier = next((t for t in self._tiers if t is not None and t.kind == kind), None)
        if tier is None:
            raise KvbmError(f"recovered blocks for tier kind {kind!r}, which this pipeline does not have "
                            f"(tiers: {[t.kind for t in self._tiers if t is not None]})")
        taken = tier.recover(slots, keys)
        if len(taken):
            self.registry.notify("kvbm_blocks_stored", tier=kind, route="restored", keys=tier.keys[taken].copy(),
                                 seq_hashes=np.zeros(len(taken), np.uint64))

    # =============================================================================== checks
    def verify(self) -> None:
        """Check the cross-structure invariants (tests call this after every step); see
        :func:`~kvbm_core.leader.invariants.check_invariants`."""
        check_invariants(self)


def _first_occurrences(lanes: np.ndarray) -> np.ndarray:
    """Mask of the first occurrence of each value (a set for small batches, a sort for large)."""
    if len(lanes) <= 64:
        seen: set[int] = set()
        return np.array([not (x in seen or seen.add(x)) for x in lanes.tolist()], bool)  # type: ignore[func-returns-value]
    _, first = np.unique(lanes, return_index=True)
    once = np.zeros(len(lanes), bool)
    once[first] = True
    return once
