"""kvbm in a cluster: KV events for routers over NATS, and this instance's record in etcd.

Both are plugins of the event hooks (:mod:`.plugin`, registered by :mod:`kvbm_core.builtin`), started
on ``kvbm_pipeline_built`` when the profile lists the transport (``transports: [..., nats]``,
``[..., etcd]``) and stopped on ``kvbm_pipeline_closed``. Each runs on a thread and event loop of its
own; the leader's scheduling thread only records what changed. A server that is down, or goes down
while the engine serves, costs events and registration, never a request.

- :mod:`.router_events`: Dynamo's router event schema as JSON, and the grouping of blocks into chains.
- :mod:`.lineage`: the parent and local hash of each block the leader hashes (a Stored event needs both).
- :mod:`.kv_events`: the publisher (bounded queue, batching, resynchronisation, reconnection).
- :mod:`.instance`: what this engine instance is (worker id, model, tiers, endpoints), as one record.
- :mod:`.registration`: that record in etcd under a lease kept alive.
"""
