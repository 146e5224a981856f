"""Finds plugins through the ``kvbm`` entry-point group, checks them, builds them, calls their hooks.

The registry is the only place that imports plugin code. Core knows no plugin by name: a profile's
``kind: disk`` is resolved here to whichever installed distribution contributes a tier named
``disk``. Failures are :class:`~kvbm_core.errors.PluginError` naming the distribution at fault.

- **Loading** never stops at a broken plugin. An import that fails (or calls ``sys.exit``), a
  misspelt hook, a plugin name taken twice, or a contributed class that breaks its kind's contract
  is recorded as that plugin's :attr:`PluginInfo.problem` (the plugin then contributes nothing), so
  ``kvbm plugins`` lists everything installed. Whatever needs the plugin types
  (:meth:`Registry.types`: settings, ``kvbm config show``, ``kvbm doctor``, serving) raises the
  first problem.
- **Types** are collected through pluggy: each type hook is called once per contributing plugin
  (``pm.subset_hook_caller``, which keeps every hook wrapper), so each class is attributed to its
  distribution. A class is checked against its kind's row of
  :data:`~kvbm_core.plugin_kinds.PLUGIN_KINDS` (base, name, clashes, contract). A name claimed
  twice is reported as a clash and the classes claiming it are not checked further.
- **Instances** are built through :meth:`Registry.create`: a constructor that raises something
  other than a :class:`~kvbm_core.errors.KvbmError` (which names its own key or path), or an
  instance that breaks its contract, is a PluginError naming the distribution.
- **Events** go through pluggy (``pm.hook.<name>(**kwargs)``), so wrappers, ``tryfirst``/``trylast``
  and tracing apply. pluggy stops a call at the first implementation that raises, so a wrapper
  could only swallow the error after the other subscribers were skipped; instead each event
  implementation is wrapped once, when its plugin registers, in a guard that logs the failure with
  the plugin and distribution and returns None. A broken subscriber never stops the others.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import pluggy
import structlog

from kvbm_core import hookspecs
from kvbm_core.errors import PLUGIN_FAILURES, ConfigError, KvbmError, PluginError
from kvbm_core.plugin_kinds import KINDS, PLUGIN_KINDS, TYPE_HOOKS

ENTRY_POINT_GROUP = "kvbm"
DISABLE_VARIABLE = "DYN_KVBM_DISABLE_PLUGINS"

log = structlog.get_logger("kvbm.registry")


@dataclass(frozen=True)
class PluginInfo:
    """One plugin as ``kvbm plugins`` lists it: registered, blocked, or broken (``problem`` says why)."""

    name: str
    distribution: str
    version: str
    module: str
    enabled: bool
    problem: str | None = None

    @property
    def status(self) -> str:
        """``ok``, ``blocked`` (by ``DYN_KVBM_DISABLE_PLUGINS``) or ``broken``."""
        if not self.enabled:
            return "blocked"
        return "broken" if self.problem else "ok"


@dataclass(frozen=True)
class TypeEntry:
    """A plugin class contributed under ``kind`` and ``name`` by ``plugin`` of ``distribution``."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str
    version: str

    @property
    def label(self) -> str:
        """How errors and logs call it, e.g. ``eviction 'fifo' (FifoEviction)``."""
        return f"{self.kind} {self.name!r} ({self.cls.__qualname__})"


def blocked_from_environment(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Plugin names listed (comma-separated) in ``DYN_KVBM_DISABLE_PLUGINS``."""
    raw = (environ if environ is not None else os.environ).get(DISABLE_VARIABLE, "")
    return frozenset(p.strip() for p in raw.split(",") if p.strip())


class Registry:
    """A pluggy plugin manager plus the checked index of contributed types (see the module docstring)."""

    def __init__(self, blocked: Iterable[str] = (), load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._infos: list[PluginInfo] = []  # in registration order
        self._blocked = frozenset(blocked)
        for name in self._blocked:
            self.pm.set_blocked(name)
        self._index: dict[str, dict[str, TypeEntry]] | None = None
        if load_entry_points:
            for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                self._load(ep)

    # ----------------------------------------------------------------------------- loading
    def _load(self, ep: metadata.EntryPoint) -> None:
        dist = ep.dist.name if ep.dist is not None else "(unknown)"
        version = ep.dist.version if ep.dist is not None else "?"
        if ep.name in self._blocked:
            self._infos.append(PluginInfo(ep.name, dist, version, ep.value, enabled=False))
            return
        try:
            module = ep.load()
        except PLUGIN_FAILURES as exc:  # any import-time failure is the plugin's, not ours
            problem = f"entry point {ep.name} = {ep.value} failed to import: {exc!r}"
            self._infos.append(PluginInfo(ep.name, dist, version, ep.value, enabled=True, problem=problem))
            return
        try:
            self.register(module, ep.name, dist, version)
        except PluginError as exc:
            self._infos.append(PluginInfo(ep.name, dist, version, ep.value, enabled=True, problem=exc.reason))

    def register(self, plugin: Any, name: str, distribution: str = "(in-process)", version: str = "") -> None:
        """Register a plugin object (a module or an instance with hook implementations).

        A plugin name already taken, hook arguments that differ from the spec, or a hook name that
        matches no spec (a typo) is a :class:`PluginError` naming ``distribution``, and nothing is
        registered. The plugin's classes are checked when types are next collected.
        """
        module = getattr(plugin, "__name__", type(plugin).__module__)
        if name in self._blocked:
            self._infos.append(PluginInfo(name, distribution, version, module, enabled=False))
            return
        taken = next((i for i in self._infos if i.name == name and i.enabled), None)
        if taken is not None:
            raise PluginError(distribution, f"plugin name {name!r} is also registered by {taken.distribution!r}")
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(distribution, f"cannot register plugin {name!r}: {exc}") from exc
        unknown = sorted(
            caller.name for caller in self.pm.get_hookcallers(plugin) or ()
            if not caller.has_spec()
            and any(i.plugin is plugin and not i.optionalhook for i in caller.get_hookimpls())
        )
        if unknown:
            self.pm.unregister(plugin)
            raise PluginError(distribution, f"plugin {name!r} implements unknown hook(s) {', '.join(unknown)} "
                                            "(the hooks are listed in kvbm_core.hookspecs)")
        self._isolate_events(plugin, name, distribution)
        self._infos.append(PluginInfo(name, distribution, version, module, enabled=True))
        self._index = None

    def _isolate_events(self, plugin: Any, name: str, distribution: str) -> None:
        """Wrap the plugin's event implementations so that each fails alone (see the module docstring)."""
        for caller in self.pm.get_hookcallers(plugin) or ():
            if caller.name in TYPE_HOOKS:
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                    impl.function = _isolated(impl.function, caller.name, name, distribution)  # type: ignore[misc]

    # ------------------------------------------------------------------------------ lookup
    @property
    def plugins(self) -> list[PluginInfo]:
        """Every plugin found, broken and blocked ones included, by name."""
        self._collected()
        return sorted(self._infos, key=lambda p: (p.name, p.distribution))

    @property
    def problems(self) -> list[PluginError]:
        """One error per broken plugin, by plugin name."""
        return [PluginError(p.distribution, p.problem) for p in self.plugins if p.problem]

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def types(self, kind: str) -> dict[str, TypeEntry]:
        """All types of ``kind`` by name (``tier``, ``eviction``, ``filter``, ``transport``).

        Raises the first :attr:`problems` entry when any plugin is broken.
        """
        index = self._collected()
        problems = self.problems
        if problems:
            raise problems[0]
        return index[kind]

    def entry(self, kind: str, name: str, key: str) -> TypeEntry:
        """The entry registered as ``name``; a :class:`ConfigError` naming ``key`` if there is none."""
        entries = self.types(kind)
        if name not in entries:
            raise ConfigError(key, f"unknown {kind} {name!r}", entries.keys() or ["(none installed)"])
        return entries[name]

    def get(self, kind: str, name: str, key: str) -> type:
        """The class registered as ``name``; a :class:`ConfigError` naming ``key`` if there is none."""
        return self.entry(kind, name, key).cls

    def create(self, kind: str, name: str, key: str, *args: Any, **kwargs: Any) -> Any:
        """An instance of the ``kind`` type ``name``, checked against its contract.

        A :class:`~kvbm_core.errors.KvbmError` from the constructor (a bad option, a missing
        directory) propagates as it is; any other failure, and an instance that breaks its kind's
        contract (closed again), is a :class:`PluginError` naming the distribution.
        """
        entry = self.entry(kind, name, key)
        try:
            instance = entry.cls(*args, **kwargs)
        except KvbmError:
            raise
        except PLUGIN_FAILURES as exc:
            raise PluginError(entry.distribution, f"{entry.label} failed to start: {exc!r}") from exc
        check = KINDS[kind].check_instance
        if check is not None:
            try:
                problem = check(instance)
            except PLUGIN_FAILURES as exc:
                problem = f"raised {exc!r} when its members were read"
            if problem:
                self.close(instance)
                raise PluginError(entry.distribution, f"{entry.label} breaks its contract once built: {problem}")
        return instance

    def close(self, instance: Any) -> None:
        """``instance.close()``; a failure is logged naming the distribution, never raised (so that
        the caller can go on releasing everything else)."""
        try:
            instance.close()
        except PLUGIN_FAILURES as exc:
            origin = self.origin(type(instance))
            log.error("plugin close() failed; continuing", plugin_type=origin.label if origin else repr(instance),
                      distribution=origin.distribution if origin else "(unknown)", error=repr(exc))

    def origin(self, cls: type) -> TypeEntry | None:
        """The entry that contributed ``cls``, if a registered plugin did."""
        for entries in self._collected().values():
            for entry in entries.values():
                if entry.cls is cls:
                    return entry
        return None

    def contributions(self, plugin: str) -> dict[str, list[str]]:
        """What an enabled plugin provides: type names by kind, and ``events`` -> the event hooks it implements."""
        index = self._collected()
        out: dict[str, list[str]] = {}
        for kind in PLUGIN_KINDS:
            names = sorted(e.name for e in index[kind.name].values() if e.plugin == plugin)
            if names:
                out[kind.name] = names
        obj = self.pm.get_plugin(plugin)
        callers = self.pm.get_hookcallers(obj) if obj is not None else None
        events = sorted(c.name for c in callers or () if c.name not in TYPE_HOOKS)
        if events:
            out["events"] = events
        return out

    # -------------------------------------------------------------------- type collection
    def _collected(self) -> dict[str, dict[str, TypeEntry]]:
        if self._index is None:
            self._index = self._collect()
        return self._index

    def _collect(self) -> dict[str, dict[str, TypeEntry]]:
        """Call the type hooks, check every class; broken plugins are recorded and unregistered."""
        problems: dict[str, str] = {}
        claims: dict[str, list[TypeEntry]] = {}
        for info in self._infos:
            if info.status != "ok":
                continue
            found = self._claims_of(info)
            if isinstance(found, str):
                problems[info.name] = found
            else:
                claims[info.name] = found
        claimants: dict[tuple[str, str], set[str]] = {}
        for plugin, entries in claims.items():
            for e in entries:
                claimants.setdefault((e.kind, e.name), set()).add(plugin)
        index: dict[str, dict[str, TypeEntry]] = {kind.name: {} for kind in PLUGIN_KINDS}
        for plugin, entries in claims.items():
            clash = _first_clash(entries, index)
            if clash is not None:
                problems[plugin] = clash
                continue
            for e in entries:
                index[e.kind][e.name] = e
        for entries in index.values():
            for e in entries.values():
                if len(claimants[(e.kind, e.name)]) == 1 and e.plugin not in problems:
                    problem = _class_problem(e)
                    if problem:
                        problems[e.plugin] = f"{e.label} {problem}"
        for i, info in enumerate(self._infos):
            if info.name in problems and info.status == "ok":
                self._infos[i] = replace(info, problem=problems[info.name])
                self.pm.unregister(name=info.name)
        return {kind: {n: e for n, e in entries.items() if e.plugin not in problems} for kind, entries in index.items()}

    def _claims_of(self, info: PluginInfo) -> list[TypeEntry] | str:
        """The classes one plugin contributes, each with its kind's base and a name, or its problem."""
        plugin = self.pm.get_plugin(info.name)
        out: list[TypeEntry] = []
        for kind in PLUGIN_KINDS:
            impls = getattr(self.pm.hook, kind.hook_name).get_hookimpls()
            contributors = [i.plugin for i in impls if not (i.wrapper or i.hookwrapper)]
            if plugin not in contributors:
                continue
            others = [p for p in contributors if p is not plugin]
            try:
                results = self.pm.subset_hook_caller(kind.hook_name, others)()
            except PLUGIN_FAILURES as exc:
                return f"{kind.hook_name}() raised {exc!r}"
            for result in results:
                if isinstance(result, (str, bytes)) or not isinstance(result, Iterable):
                    return f"{kind.hook_name}() returned {result!r}, not a list of classes"
                for cls in result:
                    if not (isinstance(cls, type) and issubclass(cls, kind.base)):
                        return f"{kind.hook_name}() returned {cls!r}, which is not a subclass of {kind.base.__name__}"
                    type_name = getattr(cls, "name", None)
                    if not isinstance(type_name, str) or not type_name:
                        return f"{cls.__qualname__} has no string 'name'"
                    out.append(TypeEntry(kind.name, type_name, cls, info.name, info.distribution, info.version))
        return out

    # ------------------------------------------------------------------------------ events
    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an event hook through pluggy; a subscriber that raises is logged, not propagated.

        A call that misses an argument of the hook's spec is the caller's bug: :class:`TypeError`.
        """
        caller = getattr(self.pm.hook, hook_name)
        missing = [a for a in caller.spec.argnames if a not in kwargs] if caller.spec else []
        if missing:
            raise TypeError(f"{hook_name}() called without {', '.join(missing)}")
        try:
            caller(**kwargs)
        except PLUGIN_FAILURES:  # only a hook wrapper can still raise here
            log.exception("event hook wrapper failed", hook=hook_name)


def _isolated(function: Callable[..., Any], hook: str, plugin: str, distribution: str) -> Callable[..., Any]:
    """``function``, with a failure logged (naming ``plugin`` and ``distribution``) instead of raised."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except PLUGIN_FAILURES:
            log.exception("event hook failed", hook=hook, plugin=plugin, distribution=distribution)
            return None

    return call


def _first_clash(entries: list[TypeEntry], index: Mapping[str, Mapping[str, TypeEntry]]) -> str | None:
    """The first name in ``entries`` already taken in ``index`` or twice in ``entries``, as a problem."""
    own: set[tuple[str, str]] = set()
    for e in entries:
        holder = index[e.kind].get(e.name)
        if holder is not None:
            return (f"{e.kind} name {e.name!r} is already provided by distribution {holder.distribution!r} "
                    f"(plugin {holder.plugin!r}); block one with {DISABLE_VARIABLE}")
        if (e.kind, e.name) in own:
            return f"{e.kind} name {e.name!r} is returned twice by {KINDS[e.kind].hook_name}()"
        own.add((e.kind, e.name))
    return None


def _class_problem(entry: TypeEntry) -> str | None:
    try:
        return KINDS[entry.kind].check_class(entry.cls)
    except PLUGIN_FAILURES as exc:  # reading the class ran plugin code (a property, a metaclass)
        return f"could not be checked: {exc!r}"


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry built from installed entry points and ``DYN_KVBM_DISABLE_PLUGINS``."""
    global _default
    if _default is None:
        _default = Registry(blocked_from_environment())
    return _default
