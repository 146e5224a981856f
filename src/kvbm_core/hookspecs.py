"""Every extension point of kvbm, one hook each: the table of contents for plugin authors.

A plugin is a module (or object) registered under the ``kvbm`` entry-point group that implements
some of these hooks with ``@kvbm_core.hookimpl``. Core's own built-ins (LRU eviction, the
in-process transport, metrics) are plugins of the same hooks. Core calls every hook through
pluggy (``pm.hook.<name>(...)``), so hook wrappers, ``tryfirst``/``trylast`` and tracing apply.

Two families:

- **Type hooks** contribute plugin classes by name. Each returns a sequence of classes; results of
  all plugins are collected (none wins over another) and a name claimed twice is an error naming
  both distributions. :data:`kvbm_core.plugin_kinds.PLUGIN_KINDS` binds each type hook to its kind,
  base class, profile key and the checks its classes must pass when the plugin registers.
- **Event hooks** (``kvbm_pipeline_*``, ``kvbm_blocks_*``, ``kvbm_transfer_failed``,
  ``kvbm_request_*``, ``kvbm_tier_*``) are called by core when something happened. Their return
  value is ignored. They run on the leader's scheduling path: keep them cheap, and never raise (an
  exception is logged with the plugin's name and swallowed, and the other subscribers still run).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import numpy as np

    from kvbm_core.interfaces import EvictionPolicy, OffloadFilter, Transport
    from kvbm_core.storage import BlockFileStorage, HostStorage

PROJECT = "kvbm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------- types
@hookspec
def kvbm_tier_types() -> Sequence[type["HostStorage | BlockFileStorage"]]:
    """Storage tier classes, selected in a profile as ``tiers: [{kind: NAME}]``.

    A tier subclasses the storage base of its ``level``: :class:`~kvbm_core.storage.HostStorage`
    (host memory the engine copies rows of) or :class:`~kvbm_core.storage.BlockFileStorage`
    (records in a file), and implements every member of it.
    """


@hookspec
def kvbm_eviction_policies() -> Sequence[type["EvictionPolicy"]]:
    """Eviction policy classes, selected as ``eviction: NAME`` (one instance per tier)."""


@hookspec
def kvbm_offload_filters() -> Sequence[type["OffloadFilter"]]:
    """Offload admission filters, selected as ``disk_offload_filter: {name: NAME}`` (host -> disk)."""


@hookspec
def kvbm_transports() -> Sequence[type["Transport"]]:
    """Transports (control plane, KV events), selected as ``transports: [NAME, ...]``."""


# -------------------------------------------------------------------------------------- events
@hookspec
def kvbm_pipeline_built(pipeline: Any) -> None:
    """The leader assembled its pipeline (tiers sized, policies and filters built).

    ``pipeline`` exposes ``settings`` and ``tiers`` (name, level, num_slots, bytes_per_block).
    """


@hookspec
def kvbm_pipeline_closed(pipeline: Any) -> None:
    """The pipeline is shutting down; release what ``kvbm_pipeline_built`` acquired."""


@hookspec
def kvbm_blocks_stored(tier: str, route: str, keys: "np.ndarray", seq_hashes: "np.ndarray") -> None:
    """Blocks became readable in ``tier`` (their write completed).

    ``route`` is how they got there (``d2h``, ``h2disk``, ``d2disk``, ``restored``); ``keys`` is an
    ``[n, 2]`` uint64 array of block identities, ``seq_hashes`` the ``[n]`` uint64
    Dynamo-compatible sequence hashes (0 where unknown, for example blocks found on disk at start).
    """


@hookspec
def kvbm_blocks_removed(tier: str, keys: "np.ndarray", seq_hashes: "np.ndarray") -> None:
    """Blocks left ``tier`` (evicted, invalidated after a failed read, or dropped at close)."""


@hookspec
def kvbm_blocks_onboarded(tier: str, request_id: int, num_blocks: int, num_bytes: int, seconds: float) -> None:
    """``num_blocks`` blocks of ``tier`` were copied into the device pool for ``request_id``."""


@hookspec
def kvbm_blocks_offloaded(route: str, num_blocks: int, num_bytes: int, seconds: float) -> None:
    """An offload operation of ``num_blocks`` blocks along ``route`` completed."""


@hookspec
def kvbm_request_matched(
    request_id: int, requested_tokens: int, device_tokens: int, host_tokens: int, disk_tokens: int
) -> None:
    """The leader answered ``get_num_new_matched_tokens``: how much of the prompt each tier covers."""


@hookspec
def kvbm_request_finished(request_id: int, queried_blocks: int, host_hit_blocks: int, disk_hit_blocks: int) -> None:
    """A request finished; the figures feed block-weighted hit rates."""


@hookspec
def kvbm_transfer_failed(route: str, op_id: int, request_id: int, error: str) -> None:
    """An operation failed. It is never counted as done; the leader recomputes or fails the request."""


@hookspec
def kvbm_blocks_declined(tier: str, request_id: int, num_blocks: int) -> None:
    """Matched blocks of ``tier`` were not promised: loading them was predicted slower than
    recomputing them (the cost model)."""


@hookspec
def kvbm_tier_service_changed(tier: str, in_service: bool, error: str) -> None:
    """A tier's device failed repeatedly and the tier was taken out of service (``in_service`` False,
    ``error`` the last failure), or it came back after a successful trial (see ``leader.breaker``)."""


@hookspec
def kvbm_tier_recovered(tier: str, recovered: int, discarded: Mapping[str, int]) -> None:
    """At start, rank 0's file-backed tier found ``recovered`` records of an earlier process intact and
    discarded others, counted by reason (``RecoveryReport.discarded``)."""
