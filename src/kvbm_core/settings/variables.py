"""Which ``DYN_KVBM_*`` names an environment holds: kvbm's own, Dynamo's that kvbm does not use, or typos.

A misspelt variable (``DYN_KVBM_CPU_CACHE_GIGS``) would otherwise be ignored without a word and the
engine would run without the tier the user asked for, so it is a :class:`ConfigError` naming the
closest variable kvbm reads. A variable of Dynamo's KVBM that kvbm has no use for (a YAML and an
environment written for Dynamo should still start) is a notice saying what kvbm does instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from kvbm_core.errors import ConfigError
from kvbm_core.registry import DISABLE_VARIABLE
from kvbm_core.settings.environment import PREFIX, seed_variables

_NO_ZMQ = "kvbm uses no ZMQ: leader and workers talk through its transports (profile key 'transports')"
_BATCHING = "kvbm's transfer engine issues each step's copies as a few batched operations of its own"
_EVENTS = ("kvbm has no KV-event consolidator: it publishes its own tiers' KV events over NATS when a profile "
           "lists the 'nats' transport (README, 'Cluster')")
_PINNED = "kvbm allocates pinned host memory through torch, without write-combined or NUMA options"
_NCCL = "kvbm has no replicated (NCCL) mode: every TP rank stores its own shard"
_GONE = "no longer read by Dynamo either"

DYNAMO_ONLY: Mapping[str, str] = {
    "DYN_KVBM_MAX_CONCURRENT_TRANSFERS": _BATCHING,
    "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": _BATCHING,
    "DYN_KVBM_TRANSFER_BATCH_SIZE": _BATCHING,
    "DYN_KVBM_LEADER_ZMQ_HOST": _NO_ZMQ,
    "DYN_KVBM_LEADER_ZMQ_PUB_PORT": _NO_ZMQ,
    "DYN_KVBM_LEADER_ZMQ_ACK_PORT": _NO_ZMQ,
    "DYN_KVBM_DISK_ALLOCATOR_TYPE": "kvbm's disk tier opens its file with O_DIRECT itself (DYN_KVBM_DISK_DISABLE_O_DIRECT turns it off)",
    "DYN_KVBM_ENABLE_RECORD": "a vLLM recording mode of Dynamo; kvbm has none",
    "DYN_KVBM_NCCL_MLA_MODE": _NCCL,
    "DYN_KVBM_NCCL_MAX_CTAS": _NCCL,
    "DYN_KVBM_KV_EVENTS_ENABLE_CONSOLIDATOR": _EVENTS,
    "DYN_KVBM_TRTLLM_ZMQ_PORT": _EVENTS,
    "DYN_KVBM_ENABLE_NUMA": _PINNED,
    "DYN_KVBM_DISABLE_WRITE_COMBINED": _PINNED,
    "DYN_KVBM_BARRIER_ID_PREFIX": _GONE,
    "DYN_KVBM_SLEEP": _GONE,
    "DYN_KVBM_METRICS_STANDALONE": _GONE,
}
"""Dynamo KVBM's variables that kvbm does not read, with what kvbm does instead."""

DYNAMO_ONLY_PREFIXES: Mapping[str, str] = {
    "DYN_KVBM_OBJECT_": "kvbm has no object-storage tier (a tier plugin could add one)",
    "DYN_KVBM_NIXL_BACKEND_": "kvbm does not use NIXL: tiers move bytes with torch and the disk tier's own I/O",
}


def known_variables() -> list[str]:
    """Every ``DYN_KVBM_*`` variable kvbm reads."""
    return [*seed_variables(), DISABLE_VARIABLE]


def check_variables(environ: Mapping[str, str]) -> list[str]:
    """Notices for Dynamo's variables kvbm ignores; a :class:`ConfigError` for any other unknown one.

    Blank variables count as unset, as everywhere in kvbm.
    """
    known = set(known_variables())
    notices = []
    for name in sorted(n.upper() for n, v in environ.items() if n.upper().startswith(PREFIX) and v.strip()):
        if name in known:
            continue
        reason = DYNAMO_ONLY.get(name) or next((r for p, r in DYNAMO_ONLY_PREFIXES.items() if name.startswith(p)), None)
        if reason is not None:
            notices.append(f"{name} is a variable of Dynamo's KVBM that kvbm does not read: {reason}")
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(name, f"unknown kvbm variable{hint}", known)
    return notices
