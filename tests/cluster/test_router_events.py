"""The router event schema, the grouping of blocks into chains, and the lineage the leader's sequence
chain hands to publishers (parents and token hashes as Dynamo's router computes them)."""

from __future__ import annotations

import json
from array import array

from clusterkit import router_hashes

from kvbm_core.cluster import lineage, router_events
from kvbm_core.identity import DynamoSequenceChain, dynamo_salt_hash, token_array


def test_events_are_dynamo_router_events_in_json():
    stored = json.loads(router_events.stored(7, 12, "host_pinned", 991, [(5, 6), (8, 9)]))
    assert stored == {"worker_id": 7, "storage_tier": "host_pinned", "event": {
        "event_id": 12, "dp_rank": 0,
        "data": {"stored": {"parent_hash": 991, "blocks": [{"block_hash": 5, "tokens_hash": 6},
                                                            {"block_hash": 8, "tokens_hash": 9}]}}}}
    removed = json.loads(router_events.removed(7, 13, "disk", [2**64 - 1]))
    assert removed["event"]["data"] == {"removed": {"block_hashes": [2**64 - 1]}}  # u64 kept exact
    assert json.loads(router_events.cleared(7, 14))["event"]["data"] == "cleared"
    assert [router_events.storage_tier(level) for level in (2, 3, 4)] == ["host_pinned", "disk", "external"]


def test_chains_put_parents_first_and_branches_apart():
    family = {1: (None, 11), 2: (1, 12), 3: (2, 13), 4: (2, 14), 5: (None, 15), 6: (99, 16)}
    runs, missing = router_events.chains([4, 3, 1, 2, 5, 6, 3, 42], family.get)
    assert missing == 1  # 42: no lineage, left out
    assert runs == [(None, [(1, 11), (2, 12), (4, 14)]), (None, [(5, 15)]), (99, [(6, 16)]), (2, [(3, 13)])]
    assert sorted(h for _, blocks in runs for h, _ in blocks) == [1, 2, 3, 4, 5, 6]  # each block once


def test_split_runs_continue_from_the_previous_part():
    run = (None, [(h, h + 10) for h in range(1, 6)])
    assert list(router_events.split([run], 2)) == [(None, [(1, 11), (2, 12)]), (2, [(3, 13), (4, 14)]),
                                                  (4, [(5, 15)])]


def test_the_chain_hands_parents_and_token_hashes_to_publishers():
    tokens = list(range(100, 100 + 16 * 7))
    pending = lineage.attach()
    try:
        chain = DynamoSequenceChain(dynamo_salt_hash(), 16)
        arr = token_array(tokens)
        chain.range_bytes(arr, 2, 3)  # hashes blocks 0..2
        chain.range_bytes(arr, 3, 7)  # then 3..6, continuing from block 2
        pending.absorb()
    finally:
        lineage.detach(pending)
    expected = router_hashes(tokens)
    assert [pending.get(seq) for seq, _, _ in expected] == [(parent, local) for _, local, parent in expected]
    assert DynamoSequenceChain.lineage_sink is None  # detached: the chains record nothing


def test_two_publishers_each_get_every_block():
    first, second = lineage.attach(), lineage.attach()
    try:
        DynamoSequenceChain(dynamo_salt_hash(), 16).range_bytes(token_array(list(range(32))), 0, 2)
    finally:
        lineage.detach(first)
        lineage.detach(second)
    (seq0, local0, _), (seq1, local1, _) = router_hashes(list(range(32)))
    for pending in (first, second):
        pending.absorb()
        assert pending.get(seq0) == (None, local0) and pending.get(seq1) == (seq0, local1)


def test_lineage_memory_is_bounded_by_two_generations():
    pending = lineage.PendingLineage(capacity=4)
    for start in range(0, 12, 2):
        pending.record(None, array("Q", [start + 1, start + 2]), [0, 0])
    pending.absorb()
    assert pending.get(12) is not None and pending.get(9) is not None
    assert pending.get(1) is None  # forgotten with the older generation
