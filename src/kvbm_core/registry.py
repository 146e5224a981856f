"""Finds plugins through the ``kvbm`` entry-point group and indexes the types they contribute.

The registry is the only place that imports plugin code. Core knows no plugin by name: a profile's
``kind: disk`` is resolved here to whichever installed distribution contributes a tier named
``disk``. Failures are :class:`~kvbm_core.errors.PluginError` naming the distribution at fault.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy
import structlog

from kvbm_core import hookspecs
from kvbm_core.errors import ConfigError, PluginError
from kvbm_core.interfaces import PLUGIN_BASES

ENTRY_POINT_GROUP = "kvbm"
DISABLE_VARIABLE = "DYN_KVBM_DISABLE_PLUGINS"

_TYPE_HOOKS: Mapping[str, str] = {
    "tier": "kvbm_tier_types",
    "eviction": "kvbm_eviction_policies",
    "filter": "kvbm_offload_filters",
    "transport": "kvbm_transports",
}

log = structlog.get_logger("kvbm.registry")


@dataclass(frozen=True)
class PluginInfo:
    """One registered (or blocked) plugin, as ``kvbm plugins`` lists it."""

    name: str
    distribution: str
    version: str
    module: str
    enabled: bool


@dataclass(frozen=True)
class TypeEntry:
    """A plugin class contributed under ``kind`` and ``name`` by ``plugin`` of ``distribution``."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str
    version: str


def blocked_from_environment(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Plugin names listed (comma-separated) in ``DYN_KVBM_DISABLE_PLUGINS``."""
    raw = (environ if environ is not None else os.environ).get(DISABLE_VARIABLE, "")
    return frozenset(p.strip() for p in raw.split(",") if p.strip())


class Registry:
    """A pluggy plugin manager plus the index of contributed types, checked for clashes."""

    def __init__(self, blocked: Iterable[str] = (), load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}
        self._blocked = frozenset(blocked)
        for name in self._blocked:
            self.pm.set_blocked(name)
        self._types: dict[str, dict[str, TypeEntry]] | None = None
        if load_entry_points:
            self._load_entry_points()

    # ----------------------------------------------------------------------------- loading
    def _load_entry_points(self) -> None:
        seen: set[str] = set()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "(unknown)"
            version = ep.dist.version if ep.dist is not None else "?"
            if ep.name in seen:
                other = self._infos[ep.name].distribution
                raise PluginError(dist, f"plugin name {ep.name!r} is also registered by {other!r}")
            seen.add(ep.name)
            if ep.name in self._blocked:
                self._infos[ep.name] = PluginInfo(ep.name, dist, version, ep.value, enabled=False)
                continue
            try:
                module = ep.load()
            except Exception as exc:  # any import-time failure is the plugin's, not ours
                raise PluginError(dist, f"entry point {ep.name} = {ep.value} failed to import: {exc!r}") from exc
            self.register(module, ep.name, dist, version)
        self.check_hook_names()

    def check_hook_names(self) -> None:
        """A ``@hookimpl`` whose name matches no hook (a typo) is an error naming its distribution."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin) or "?"
            info = self._infos.get(name)
            raise PluginError(info.distribution if info else name, f"plugin {name!r}: {exc}") from None

    def register(self, plugin: Any, name: str, distribution: str = "(in-process)", version: str = "") -> None:
        """Register a plugin object (a module or instance with hook implementations)."""
        if name in self._blocked:
            self._infos[name] = PluginInfo(name, distribution, version, _module_name(plugin), enabled=False)
            return
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(distribution, f"cannot register plugin {name!r}: {exc}") from exc
        self._infos[name] = PluginInfo(name, distribution, version, _module_name(plugin), enabled=True)
        self._types = None

    # ------------------------------------------------------------------------------ lookup
    @property
    def plugins(self) -> list[PluginInfo]:
        return sorted(self._infos.values(), key=lambda p: p.name)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def types(self, kind: str) -> dict[str, TypeEntry]:
        """All types of ``kind`` by name (``tier``, ``eviction``, ``filter``, ``transport``)."""
        if self._types is None:
            self._types = self._collect_types()
        return self._types[kind]

    def get(self, kind: str, name: str, key: str) -> type:
        """The class registered as ``name``; a :class:`ConfigError` naming ``key`` if there is none."""
        entries = self.types(kind)
        if name not in entries:
            raise ConfigError(key, f"unknown {kind} {name!r}", entries.keys() or ["(none installed)"])
        return entries[name].cls

    def contributions(self, plugin: str) -> dict[str, list[str]]:
        """What an enabled plugin provides: type names by kind, and ``events`` -> the event hooks it implements."""
        out: dict[str, list[str]] = {}
        for kind in _TYPE_HOOKS:
            names = sorted(e.name for e in self.types(kind).values() if e.plugin == plugin)
            if names:
                out[kind] = names
        obj = self.pm.get_plugin(plugin)
        events = sorted(
            c.name for c in (self.pm.get_hookcallers(obj) or []) if obj is not None and c.name not in _TYPE_HOOKS.values()
        )
        if events:
            out["events"] = events
        return out

    def _collect_types(self) -> dict[str, dict[str, TypeEntry]]:
        out: dict[str, dict[str, TypeEntry]] = {kind: {} for kind in _TYPE_HOOKS}
        for kind, hook_name in _TYPE_HOOKS.items():
            base = PLUGIN_BASES[kind]
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                info = self._infos[impl.plugin_name]
                try:
                    contributed = impl.function()
                except Exception as exc:
                    raise PluginError(info.distribution, f"{hook_name}() raised {exc!r}") from exc
                for cls in contributed or ():
                    if not (isinstance(cls, type) and issubclass(cls, base)):
                        raise PluginError(
                            info.distribution,
                            f"{hook_name}() returned {cls!r}, which is not a subclass of {base.__name__}",
                        )
                    type_name = getattr(cls, "name", None)
                    if not isinstance(type_name, str) or not type_name:
                        raise PluginError(info.distribution, f"{cls.__qualname__} has no string 'name'")
                    if type_name in out[kind]:
                        other = out[kind][type_name]
                        raise PluginError(
                            info.distribution,
                            f"{kind} name {type_name!r} is already provided by distribution "
                            f"{other.distribution!r} (plugin {other.plugin!r}); block one with {DISABLE_VARIABLE}",
                        )
                    out[kind][type_name] = TypeEntry(
                        kind, type_name, cls, impl.plugin_name, info.distribution, info.version
                    )
        return out

    # ------------------------------------------------------------------------------ events
    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an event hook on every plugin; a subscriber that raises is logged, not propagated.

        A call that misses an argument of the hook's spec is the caller's bug: :class:`TypeError`.
        """
        caller = getattr(self.pm.hook, hook_name)
        missing = [a for a in caller.spec.argnames if a not in kwargs] if caller.spec else []
        if missing:
            raise TypeError(f"{hook_name}() called without {', '.join(missing)}")
        for impl in caller.get_hookimpls():
            try:
                impl.function(*[kwargs[a] for a in impl.argnames])
            except Exception:
                log.exception("event hook failed", hook=hook_name, plugin=impl.plugin_name)


def _module_name(plugin: Any) -> str:
    return getattr(plugin, "__name__", type(plugin).__module__)


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry built from installed entry points and ``DYN_KVBM_DISABLE_PLUGINS``."""
    global _default
    if _default is None:
        _default = Registry(blocked_from_environment())
    return _default
