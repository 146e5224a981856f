"""What this engine instance is, as the JSON record it registers in etcd (and ``kvbm cluster`` lists).

Built from what ``kvbm_pipeline_built`` hands its subscribers (settings, tiers as sized, layout,
world size) plus the worker id its KV events carry, where its metrics are served and where its KV
events go. ``model`` and ``namespace`` (the digest every block key and disk record of this instance
is namespaced by, weights fingerprint included: :class:`kvbm_core.identity.Namespace`) come from the
pipeline (``pipeline.model_id``, ``pipeline.namespace``); where it has none they are ``null`` and
``layout`` still says what the KV is.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from kvbm_core import __version__
from kvbm_core.cluster import router_events
from kvbm_core.interfaces import TierLevel

RECORD_FORMAT = 1
INSTANCES = "instances/"
"""Where records live, under the etcd transport's ``prefix`` (``kvbm/instances/<worker id hex>``)."""

_LEVEL_NAMES = {TierLevel.HOST: "host", TierLevel.DISK: "disk"}


def instance_key(worker_id: int) -> str:
    return f"{INSTANCES}{worker_id:016x}"


def advertised_host(bind_host: str) -> str:
    """The address others reach a server bound to ``bind_host`` at (this host's name for a wildcard)."""
    return socket.gethostname() if bind_host in ("0.0.0.0", "::", "") else bind_host


def instance_record(pipeline: Any, worker_id: int, metrics_url: str | None,
                    kv_events: Mapping[str, Any] | None) -> dict[str, Any]:
    layout = pipeline.layout
    world_size = int(pipeline.world_size)
    model = getattr(pipeline, "model_id", None) or None
    namespace = getattr(pipeline, "namespace", b"").hex() or None
    tiers = []
    for tier in pipeline.tiers:
        level = TierLevel(tier.level)
        tiers.append({
            "kind": tier.kind,
            "level": _LEVEL_NAMES.get(level, str(int(level))),
            "storage_tier": router_events.storage_tier(level),
            "num_slots": int(tier.num_slots),
            "kv_bytes": int(tier.num_slots) * layout.bytes_per_block * world_size,  # KV it holds, all ranks
        })
    return {
        "format": RECORD_FORMAT,
        "worker_id": worker_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kvbm_version": __version__,
        "model": model,
        "namespace": namespace,
        "layout": {
            "dtype": layout.dtype,
            "num_layers": layout.num_layers,
            "kv_factor": layout.kv_factor,
            "elems_per_block": layout.elems_per_block,
            "tokens_per_block": layout.tokens_per_block,
            "bytes_per_block": layout.bytes_per_block,
        },
        "world_size": world_size,
        "tiers": tiers,
        "metrics": metrics_url,
        "kv_events": dict(kv_events) if kv_events is not None else None,
    }
