"""KV events over a real nats-server, from kvbm's connector on the reference executor: a subscriber
that sees only the events rebuilds exactly the leader's view of which blocks each tier holds, with
the hashes Dynamo's router computes from the same tokens."""

from __future__ import annotations

import urllib.request

from clusterkit import cluster_profile, conversations, router_hashes, wait_for

from kvbm_core.testing.request import cache_salt_id

CPU_DISK = [{"kind": "cpu", "num_blocks": 10}, {"kind": "disk", "num_blocks": 24}]
NO_FILTER = {"DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}


def converged(engine, index, worker_id):
    return lambda: index.held(worker_id) == engine.leader_view()


def test_index_from_events_equals_the_leaders_view_through_evictions(nats_server, subscriber, engines):
    sub = subscriber()
    engine = engines(cluster_profile(CPU_DISK, nats_server.url, worker_id=77, resync_interval_s=0), env=NO_FILTER)
    specs = conversations()
    engine.run(specs)
    publisher = engine.publisher
    assert publisher.worker_id == 77
    wait_for(converged(engine, sub.index, 77), what="the index to equal the leader's view")
    view = engine.leader_view()
    assert view["host_pinned"] and view["disk"]
    assert sub.index.counts["removed"] > 0, "the small tiers evicted blocks: removals were published"
    assert engine.manager.stats.offload_blocks_h2disk > 0
    assert not sub.index.problems

    # Every announced block carries the router's hashes of its tokens: sequence hash, token hash, parent.
    expected = {seq: (parent, local) for spec in specs for seq, local, parent in router_hashes(list(spec.prompt))}
    announced = sub.index.blocks(77)
    assert announced and all(announced[h] == expected[h] for h in announced), "hashes differ from the router's"

    # More work, more evictions: still equal.
    engine.run(conversations(seed=1))
    wait_for(converged(engine, sub.index, 77), what="the index to follow the second run")
    assert publisher.counts.dropped_blocks == 0 and publisher.counts.unannounced_blocks == 0


def test_salted_requests_are_announced_under_salted_hashes(nats_server, subscriber, engines):
    """TRT-LLM hands the connector's prefix lookup only the salt's integer id (``cache_salt_id``), so
    the router seed mixes in the text ``id:<cache_salt_id>``: never the unsalted hashes."""
    sub = subscriber()
    engine = engines(cluster_profile([{"kind": "cpu", "num_blocks": 64}], nats_server.url, worker_id=5))
    specs = conversations(users=1, turns=1, salt="tenant-a")
    engine.run(specs)
    wait_for(converged(engine, sub.index, 5), what="salted blocks announced")
    prompt = list(specs[0].prompt)
    expected = {seq for seq, _, _ in router_hashes(prompt, salt=f"id:{cache_salt_id('tenant-a')}")}
    unsalted = {seq for seq, _, _ in router_hashes(prompt)}
    announced = set(sub.index.blocks(5))
    assert announced and announced <= expected and not announced & unsalted


def test_a_subscriber_that_joins_late_asks_for_everything(nats_server, subscriber, engines):
    engine = engines(cluster_profile(CPU_DISK, nats_server.url, worker_id=9, resync_interval_s=0), env=NO_FILTER)
    engine.run(conversations(users=2, turns=2))
    late = subscriber()
    late.ask_resync()
    wait_for(converged(engine, late.index, 9), what="the late subscriber to catch up")
    assert late.index.counts["cleared"] >= 1


def test_periodic_resync_reaches_subscribers_that_cannot_ask(nats_server, subscriber, engines):
    engine = engines(cluster_profile(CPU_DISK, nats_server.url, worker_id=10, resync_interval_s=0.3), env=NO_FILTER)
    engine.run(conversations(users=2, turns=2))
    late = subscriber()  # never asks
    wait_for(converged(engine, late.index, 10), what="a periodic resynchronisation")


def test_a_full_queue_drops_counts_and_resynchronises(nats_server, subscriber, engines):
    sub = subscriber()
    # One queued change at most, published once a second: most changes of a run are dropped.
    engine = engines(cluster_profile(CPU_DISK, nats_server.url, worker_id=11, queue_size=1, flush_interval_s=1.0,
                                     resync_interval_s=0), env=NO_FILTER)
    publisher = engine.publisher
    wait_for(lambda: publisher.counts.resyncs == 1, what="the resynchronisation on connect")
    engine.run(conversations())
    assert publisher.counts.dropped_blocks > 0
    wait_for(converged(engine, sub.index, 11), what="the resynchronisation after drops")
    assert publisher.counts.resyncs >= 2


def test_close_publishes_cleared(nats_server, subscriber, engines):
    sub = subscriber()
    engine = engines(cluster_profile([{"kind": "cpu", "num_blocks": 64}], nats_server.url, worker_id=12))
    engine.run(conversations(users=1, turns=2))
    wait_for(lambda: sub.index.held(12), what="blocks announced")
    engine.close()
    wait_for(lambda: not sub.index.held(12), what="cleared at close")


def test_event_counts_are_served_with_the_metrics(nats_server, subscriber, engines, port_factory):
    sub = subscriber()
    port = port_factory()
    engine = engines(cluster_profile([{"kind": "cpu", "num_blocks": 64}], nats_server.url, worker_id=13),
                     env={"DYN_KVBM_METRICS": "true", "DYN_KVBM_METRICS_PORT": str(port),
                          "DYN_KVBM_METRICS_HOST": "127.0.0.1"})
    engine.run(conversations(users=1, turns=2))
    wait_for(converged(engine, sub.index, 13), what="events")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    series = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("kvbm_kv_")}
    assert series["kvbm_kv_events_published_total"] == engine.publisher.counts.published_events > 0
    assert series["kvbm_kv_events_dropped_blocks_total"] == 0
    assert series["kvbm_kv_events_connected"] == 1


def test_blocks_recovered_from_disk_are_not_announced(nats_server, subscriber, engines):
    """A restarted disk tier serves its previous run's blocks, whose tokens (so router hashes) it
    does not know: the leader holds them with sequence hash 0 and no event names them."""
    first = engines(cluster_profile(CPU_DISK, nats_server.url, worker_id=14), env=NO_FILTER)
    first.run(conversations(users=2, turns=2))
    assert first.leader_view()["disk"]
    first.close()
    sub = subscriber()
    second = engines(cluster_profile(CPU_DISK, nats_server.url, worker_id=15), env=NO_FILTER)
    recovered = second.manager.disk
    assert (recovered.seq[recovered.state > 0] == 0).sum() > 0, "the second engine recovered blocks"
    sub.ask_resync()
    second.run(conversations(users=1, turns=1, seed=5))  # new blocks: their events follow the resync's
    wait_for(converged(second, sub.index, 15), what="the index to hold the new blocks")
    assert sub.index.counts["cleared"] >= 1 and sub.index.held(15)["host_pinned"]
    assert 0 not in sub.index.blocks(15)
