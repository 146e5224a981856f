"""Dynamo's KV-router event schema, as the JSON kvbm publishes: one message is one ``RouterEvent``.

The structures are those of Dynamo's ``kv-router`` crate (``protocols.rs``: ``RouterEvent``,
``KvCacheEvent``, ``KvCacheEventData``), written as serde writes them in JSON::

    {"worker_id": 7, "storage_tier": "host_pinned",
     "event": {"event_id": 12, "dp_rank": 0,
               "data": {"stored": {"parent_hash": 991, "blocks": [{"block_hash": 5, "tokens_hash": 6}]}}}}
    ...        "data": {"removed": {"block_hashes": [5, 8]}}
    ...        "data": "cleared"

- ``block_hash``: the block's sequence hash (the router's ``ExternalSequenceBlockHash``), the
  ``seq_hashes`` of kvbm's event hooks (:class:`kvbm_core.identity.DynamoSequenceChain`).
- ``tokens_hash``: the hash of the block's own tokens (the router's ``LocalBlockHash``).
- ``parent_hash``: the sequence hash of the block before the first one (``null``: a prompt's first
  block). The blocks of one ``stored`` event form a chain: each is the parent of the next.
- ``storage_tier``: ``host_pinned`` for host-level tiers, ``disk`` for disk-level tiers,
  ``external`` for any other level (a remote tier).
- ``cleared``: the worker holds nothing (it applies to every tier of that worker).

Dynamo's own event plane wraps each event in an envelope of its runtime (msgpack in recent
releases); that wrapping is not documented as a wire format and is not reproduced here.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kvbm_core.interfaces import TierLevel

Lineage = tuple[int | None, int]
"""A block's ``(parent sequence hash or None, local hash)``."""

Run = tuple[int | None, list[tuple[int, int]]]
"""``(parent_hash, [(block_hash, tokens_hash), ...])``: the blocks of one Stored event."""

STORAGE_TIERS = {TierLevel.HOST: "host_pinned", TierLevel.DISK: "disk"}
EXTERNAL = "external"


def storage_tier(level: int) -> str:
    """The router's name for a tier level."""
    return STORAGE_TIERS.get(level, EXTERNAL)  # type: ignore[call-overload]


def _event(worker_id: int, event_id: int, tier: str, data: Any) -> bytes:
    event = {"worker_id": worker_id, "storage_tier": tier,
             "event": {"event_id": event_id, "data": data, "dp_rank": 0}}
    return json.dumps(event, separators=(",", ":")).encode()


def stored(worker_id: int, event_id: int, tier: str, parent: int | None, blocks: Sequence[tuple[int, int]]) -> bytes:
    data = {"stored": {"parent_hash": parent, "blocks": [{"block_hash": b, "tokens_hash": t} for b, t in blocks]}}
    return _event(worker_id, event_id, tier, data)


def removed(worker_id: int, event_id: int, tier: str, block_hashes: Sequence[int]) -> bytes:
    return _event(worker_id, event_id, tier, {"removed": {"block_hashes": list(block_hashes)}})


def cleared(worker_id: int, event_id: int) -> bytes:
    return _event(worker_id, event_id, "device", "cleared")


def chains(hashes: Iterable[int], lineage: Callable[[int], Lineage | None]) -> tuple[list[Run], int]:
    """Group blocks into chains, parents before children, each block once.

    Returns the runs (in the order their first block appears, branches after their trunk) and how
    many blocks had no known lineage (left out: a Stored event cannot name them).
    """
    info: dict[int, Lineage] = {}
    missing = 0
    for h in hashes:
        if h in info:
            continue
        found = lineage(h)
        if found is None:
            missing += 1
        else:
            info[h] = found
    children: defaultdict[int, list[int]] = defaultdict(list)
    starts: deque[int] = deque()
    for h, (parent, _) in info.items():
        if parent is not None and parent in info:
            children[parent].append(h)
        else:
            starts.append(h)
    runs: list[Run] = []
    while starts:
        h = starts.popleft()
        run_parent = info[h][0]
        run = []
        while True:
            run.append((h, info[h][1]))
            kids = children.get(h)
            if not kids:
                break
            h = kids[0]
            starts.extend(kids[1:])
        runs.append((run_parent, run))
    return runs, missing


def split(runs: Iterable[Run], max_blocks: int) -> Iterable[Run]:
    """Runs of at most ``max_blocks`` blocks; a cut run continues from its previous part's last block."""
    for parent, blocks in runs:
        for start in range(0, len(blocks), max_blocks):
            yield (parent if start == 0 else blocks[start - 1][0]), blocks[start : start + max_blocks]
