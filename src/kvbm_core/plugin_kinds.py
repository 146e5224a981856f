"""The kinds of class a plugin can contribute: one row each, and the only definition there is.

A :class:`PluginKind` row names the kind (as ``kvbm plugins`` and errors call it), the type hook of
:mod:`kvbm_core.hookspecs` that contributes classes of that kind, the base class they subclass, the
profile key that selects one by name, the check a class must pass when its plugin registers, and
the check an instance must pass when it is built. The registry, ``kvbm plugins`` and the plugin
guide (docs/plugins.md, checked by a test) all read :data:`PLUGIN_KINDS`; hooks that are not
named here are event hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kvbm_core import hookspecs
from kvbm_core.interfaces import EvictionPolicy, OffloadFilter, StorageTier, Transport
from kvbm_core.storage.contracts import check_tier_class, check_tier_instance


def unimplemented_members(cls: type) -> str | None:
    """The class check of kinds without more to check: every abstract member is implemented."""
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    return f"does not implement {', '.join(missing)}" if missing else None


@dataclass(frozen=True)
class PluginKind:
    """One kind of plugin class (see the module docstring).

    ``check_class(cls)`` and ``check_instance(obj)`` return the first problem, or None.
    """

    name: str
    hook: Callable[..., Any]
    base: type
    selected_as: str
    check_class: Callable[[type], str | None]
    check_instance: Callable[[Any], str | None] | None = None
    checked: str = "subclasses the base; implements every abstract member; has a string ``name``"

    @property
    def hook_name(self) -> str:
        return self.hook.__name__


PLUGIN_KINDS: tuple[PluginKind, ...] = (
    PluginKind(
        "tier", hookspecs.kvbm_tier_types, StorageTier, "tiers: [{kind: NAME}]", check_tier_class,
        check_tier_instance,
        checked="as every kind, plus: subclasses the storage base of its ``level`` (``HostStorage``, "
                "``BlockFileStorage``) and implements its members; positive ``read_gbps``/``write_gbps``; "
                "``bytes_per_slot`` answers an int of at least a block. When built: the base's attributes "
                "are set, and a disk tier's ``record_bytes`` equals ``bytes_per_slot(layout)``",
    ),
    PluginKind("eviction", hookspecs.kvbm_eviction_policies, EvictionPolicy, "eviction: NAME", unimplemented_members),
    PluginKind("filter", hookspecs.kvbm_offload_filters, OffloadFilter, "disk_offload_filter: {name: NAME}",
               unimplemented_members),
    PluginKind("transport", hookspecs.kvbm_transports, Transport, "transports: [NAME, ...]", unimplemented_members),
)

KINDS: Mapping[str, PluginKind] = {kind.name: kind for kind in PLUGIN_KINDS}
""":data:`PLUGIN_KINDS` by kind name."""

TYPE_HOOKS: frozenset[str] = frozenset(kind.hook_name for kind in PLUGIN_KINDS)
"""Names of the hooks that contribute classes; every other hook is an event hook."""
