"""Layering: defaults < YAML profile < ``DYN_KVBM_*`` environment, with where each value came from.

The flat seed variables map onto the pipeline as the seed guide describes:

- ``DYN_KVBM_CPU_CACHE_GB`` (or its block override) sizes the host-level tier, adding a ``cpu``
  tier when the profile has none; 0 with no override removes it.
- ``DYN_KVBM_DISK_CACHE_GB`` (or its block override) sizes the disk-level tier, adding ``disk``.
- A block override wins over GB. A GB variable alone replaces the profile's sizing of that tier
  (the profile's ``num_blocks`` is dropped), because the environment is the top layer.
- Host only: device -> host. Host + disk: device -> host, host -> disk behind the frequency filter.
  Disk only: device -> disk directly (see :mod:`kvbm_core.settings.pipeline`).

Everything the engine would reject is rejected here, once, so that ``kvbm config show``, ``kvbm
doctor`` and the engine agree: unknown variables (:mod:`kvbm_core.settings.variables`), unknown
plugin names, options a plugin refuses (a tier's or transport's ``validate_options``; an eviction
policy or filter built with its options, exactly as the leader builds it), cost-model bandwidths for
tier kinds that are not installed, and sizes this machine cannot hold
(:mod:`kvbm_core.settings.limits`). Dynamo variables kvbm does not read become ``notices``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from kvbm_core.errors import ConfigError
from kvbm_core.interfaces import TierLevel
from kvbm_core.registry import DISABLE_VARIABLE, Registry, blocked_from_environment, default_registry
from kvbm_core.settings.accepted import accepted_at
from kvbm_core.settings.environment import SeedEnvironment, variable_name
from kvbm_core.settings.limits import check_tier_sizes
from kvbm_core.settings.model import KvbmSettings
from kvbm_core.settings.profiles import PROFILE_VARIABLE, load_profile, profile_path
from kvbm_core.settings.variables import check_variables

DEFAULT = "default"
_DEFAULT_KIND = {TierLevel.HOST: "cpu", TierLevel.DISK: "disk"}

BUNDLED_DISTRIBUTIONS: Mapping[tuple[str, str], str] = {
    ("tier", "cpu"): "kvbm-tier-cpu",
    ("tier", "disk"): "kvbm-tier-disk",
    ("tier", "gds"): "kvbm-tier-gds",
    ("filter", "frequency"): "kvbm-policy-frequency",
}
"""Plugins shipped with kvbm in their own distributions: named in the error when one is missing."""

log = structlog.get_logger("kvbm.settings")

# Flat variable -> (section, key) of KvbmSettings it overrides (section None: top level).
SCALAR_OVERLAYS: Mapping[str, tuple[str | None, str]] = {
    "disk_cache_dir": ("disk", "directory"),
    "disk_zerofill_fallback": ("disk", "zerofill_fallback"),
    "disk_disable_o_direct": ("disk", "disable_o_direct"),
    "leader_worker_init_timeout_secs": (None, "leader_worker_init_timeout_secs"),
    "weights_fingerprint": (None, "weights_fingerprint"),
    "metrics": ("metrics", "enabled"),
    "metrics_host": ("metrics", "host"),
    "metrics_port": ("metrics", "port"),
    "host_offload_prefix_min_priority": (None, "host_offload_prefix_min_priority"),
    "cache_stats_max_requests": ("cache_stats", "max_requests"),
    "cache_stats_log_interval_secs": ("cache_stats", "log_interval_secs"),
    "log_format": ("logging", "format"),
    "log_level": ("logging", "level"),
}


@dataclass(frozen=True)
class ResolvedSettings:
    """The validated settings, the profile they started from, and each value's source.

    ``sources`` maps a display key (``tiers.cpu.capacity_gb``, ``disk.directory``) to
    ``default``, ``profile:<name>`` or ``env:<VARIABLE>``; ``profile_path`` is the profile's file.
    ``notices`` are warnings that stop nothing (Dynamo variables kvbm does not read).
    """

    settings: KvbmSettings
    profile: str | None
    sources: dict[str, str] = field(default_factory=dict)
    profile_path: Path | None = None
    notices: tuple[str, ...] = ()

    def source_of(self, key: str) -> str:
        return self.sources.get(key, DEFAULT)


def resolve_settings(
    environ: Mapping[str, str] | None = None,
    profile: str | None = None,
    registry: Registry | None = None,
    log_notices: bool = True,
) -> ResolvedSettings:
    """Resolve settings once. ``profile`` (a name or path) takes the place of ``DYN_KVBM_PROFILE``.

    ``log_notices``: log each notice as a warning (the engine); the CLI prints them itself.
    """
    registry = registry or default_registry()
    environ = os.environ if environ is None else environ
    notices = check_variables(environ)
    _check_blocked_names(environ, registry)
    env = SeedEnvironment.load(environ)
    sources: dict[str, str] = {}
    data: dict[str, Any] = {}
    label: str | None = None
    path: Path | None = None

    chosen = profile if profile is not None else env.profile
    if chosen:
        source_key = "--profile" if profile is not None else PROFILE_VARIABLE
        label, data = load_profile(chosen, source_key)
        path = profile_path(chosen, source_key)
        data = copy.deepcopy(data)
        _record(sources, _display_keys(data), f"profile:{label}")

    _check_tier_kinds(data, registry, label)
    _apply_environment(data, env, registry, sources)
    settings = _validate(data, label, sources)
    _check_pipeline(settings, registry, label, sources)
    if log_notices:
        for notice in notices:
            log.warning(notice)
    return ResolvedSettings(settings, label, sources, path, tuple(notices))


# ----------------------------------------------------------------------------------- overlay
def _apply_environment(data: dict[str, Any], env: SeedEnvironment, registry: Registry, sources: dict[str, str]) -> None:
    tiers: list[dict[str, Any]] = data.setdefault("tiers", [])
    for level, gb_var, blocks_var in (
        (TierLevel.HOST, "cpu_cache_gb", "cpu_cache_override_num_blocks"),
        (TierLevel.DISK, "disk_cache_gb", "disk_cache_override_num_blocks"),
    ):
        gb, blocks = getattr(env, gb_var), getattr(env, blocks_var)
        if gb is None and blocks is None:
            continue
        tier = next((t for t in tiers if _level(t.get("kind"), registry) == level), None)
        if tier is None:
            if not (gb or blocks):
                continue  # "0" for a tier the profile does not have: nothing to remove
            tier = {"kind": _DEFAULT_KIND[level]}
            tiers.insert(0 if level == TierLevel.HOST else len(tiers), tier)
            sources[f"tiers.{tier['kind']}.kind"] = _env(gb_var if gb is not None else blocks_var)
        kind = tier["kind"]
        if gb is not None:
            tier["capacity_gb"] = gb
            sources[f"tiers.{kind}.capacity_gb"] = _env(gb_var)
            if blocks is None and tier.pop("num_blocks", None) is not None:
                sources[f"tiers.{kind}.num_blocks"] = _env(gb_var)
        if blocks is not None:
            tier["num_blocks"] = blocks
            sources[f"tiers.{kind}.num_blocks"] = _env(blocks_var)
        size = tier.get("num_blocks") if tier.get("num_blocks") is not None else tier.get("capacity_gb")
        if not size:
            tiers.remove(tier)  # sized 0 from the environment: the tier is switched off
            for key in [k for k in sources if k.startswith(f"tiers.{kind}.")]:
                del sources[key]

    for var, (section, key) in SCALAR_OVERLAYS.items():
        value = getattr(env, var)
        if value is None:
            continue
        target = data.setdefault(section, {}) if section else data
        if not isinstance(target, dict):
            raise ConfigError(section or key, f"must be a mapping, got {target!r}")
        target[key] = value
        sources[f"{section}.{key}" if section else key] = _env(var)
    if env.disable_disk_offload_filter is not None:
        section = data.setdefault("disk_offload_filter", {})
        if not isinstance(section, dict):
            raise ConfigError("disk_offload_filter", f"must be a mapping, got {section!r}")
        section["enabled"] = not env.disable_disk_offload_filter
        sources["disk_offload_filter.enabled"] = _env("disable_disk_offload_filter")


def _env(field_name: str) -> str:
    return f"env:{variable_name(field_name)}"


def _level(kind: Any, registry: Registry) -> TierLevel | None:
    entry = registry.types("tier").get(kind) if isinstance(kind, str) else None
    return entry.cls.level if entry else None


# -------------------------------------------------------------------------------- validation
def _where(label: str | None) -> str:
    return f"profile {label}: " if label else ""


def _check_tier_kinds(data: dict[str, Any], registry: Registry, label: str | None) -> None:
    tiers = data.get("tiers", [])
    if not isinstance(tiers, list):
        raise ConfigError(f"{_where(label)}tiers", "must be a list of tiers, each a mapping with 'kind'")
    known = registry.types("tier")
    for i, tier in enumerate(tiers):
        kind = tier.get("kind") if isinstance(tier, dict) else None
        if kind not in known:
            raise ConfigError(f"{_where(label)}tiers[{i}].kind", f"unknown tier kind {kind!r}{_install_hint('tier', kind)}", known.keys() or ["(none installed)"])


def _install_hint(kind: str, name: Any) -> str:
    distribution = BUNDLED_DISTRIBUTIONS.get((kind, name)) if isinstance(name, str) else None
    if distribution is None:
        return ""
    return f": it comes with the {distribution} distribution (pip install {distribution}, or \"kvbm-core[all]\")"


def _check_blocked_names(environ: Mapping[str, str], registry: Registry) -> None:
    known = {p.name for p in registry.plugins}
    for name in sorted(blocked_from_environment(environ) - known):
        raise ConfigError(DISABLE_VARIABLE, f"no installed plugin is named {name!r} (names as kvbm plugins lists them)", known)


def _validate(data: dict[str, Any], label: str | None, sources: dict[str, str]) -> KvbmSettings:
    try:
        return KvbmSettings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        origin = sources.get(_loc_to_key(err["loc"], data), "")
        where = origin.removeprefix("env:") if origin.startswith("env:") else f"{_where(label)}{_raw_loc(err['loc'])}"
        accepted = None if err["type"] == "value_error" else accepted_at(KvbmSettings, err["loc"], err["type"])
        raise ConfigError(where, f"{err['msg']} (got {err.get('input')!r})", accepted) from None


def _check_pipeline(settings: KvbmSettings, registry: Registry, label: str | None, sources: dict[str, str]) -> None:
    where = _where(label)
    tier_types = registry.types("tier")
    levels = []
    for i, tier in enumerate(settings.tiers):
        if tier.kind not in tier_types:  # a tier the environment added (cpu, disk) whose plugin is missing
            origin = sources.get(f"tiers.{tier.kind}.kind", "")
            key = origin.removeprefix("env:") if origin.startswith("env:") else f"{where}tiers[{i}].kind"
            hint = _install_hint("tier", tier.kind)
            raise ConfigError(key, f"unknown tier kind {tier.kind!r}{hint}", tier_types.keys() or ["(none installed)"])
        cls = registry.get("tier", tier.kind, f"{where}tiers[{i}].kind")
        cls.validate_options(tier.options, f"{where}tiers[{i}].options")
        levels.append(tier_types[tier.kind].cls.level)
    if len(set(levels)) != len(levels):
        raise ConfigError(f"{where}tiers", "at most one host-level and one disk-level tier", tier_types.keys())
    if levels != sorted(levels):
        raise ConfigError(f"{where}tiers", "host-level tiers come before disk-level tiers")
    eviction = registry.get("eviction", settings.eviction, f"{where}eviction")
    _check_options(lambda: eviction(1, settings.eviction_options), eviction, settings.eviction_options, f"{where}eviction_options")
    if settings.disk_offload_filter.enabled and set(levels) == {TierLevel.HOST, TierLevel.DISK}:
        name = settings.disk_offload_filter.name
        if name not in registry.types("filter"):
            hint = _install_hint("filter", name)
            raise ConfigError(f"{where}disk_offload_filter.name", f"unknown filter {name!r}{hint}", registry.types("filter").keys() or ["(none installed)"])
        offload_filter = registry.get("filter", name, f"{where}disk_offload_filter.name")
        options = settings.disk_offload_filter.options
        _check_options(lambda: offload_filter(options), offload_filter, options, f"{where}disk_offload_filter.options")
    for i, name in enumerate(settings.transports):
        cls = registry.get("transport", name, f"{where}transports[{i}]")
        cls.validate_options(settings.transport_options.get(name, {}), f"{where}transport_options.{name}")
    for kind in settings.cost_model.bandwidth_gbps:
        if kind not in tier_types:
            raise ConfigError(f"{where}cost_model.bandwidth_gbps.{kind}", "not an installed tier kind", tier_types.keys())
    check_tier_sizes(settings, lambda kind: tier_types[kind].cls.level, lambda kind, f: _size_source(sources, where, settings, kind, f))


def _check_options(build: Any, cls: type, options: Mapping[str, Any], key: str) -> None:
    """Options as the leader will use them: the plugin's ``validate_options`` when it has one, then the
    plugin built with them as the leader builds it (its constructor checks them too), so this rejects
    exactly what the leader would."""
    validate = getattr(cls, "validate_options", None)
    if validate is not None:
        validate(options, key)
    try:
        build()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(key, f"refused by {cls.__name__}: {exc}") from None


def _size_source(sources: Mapping[str, str], where: str, settings: KvbmSettings, kind: str, field_name: str) -> str:
    origin = sources.get(f"tiers.{kind}.{field_name}", "")
    if origin.startswith("env:"):
        return origin.removeprefix("env:")
    index = next(i for i, t in enumerate(settings.tiers) if t.kind == kind)
    return f"{where}tiers[{index}].{field_name}"


def _raw_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _loc_to_key(loc: tuple[Any, ...], data: dict[str, Any]) -> str:
    if len(loc) >= 2 and loc[0] == "tiers" and isinstance(loc[1], int):
        tiers = data.get("tiers", [])
        kind = tiers[loc[1]].get("kind") if loc[1] < len(tiers) and isinstance(tiers[loc[1]], dict) else loc[1]
        return ".".join(["tiers", str(kind), *map(str, loc[2:])])
    return ".".join(map(str, loc))


# ------------------------------------------------------------------------------- provenance
def _display_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key == "tiers" and not prefix and isinstance(value, list):
            for tier in value:
                if isinstance(tier, dict):
                    keys += _display_keys(tier, f"tiers.{tier.get('kind')}.")
        elif isinstance(value, dict) and value and not key.endswith("options"):
            keys += _display_keys(value, f"{path}.")
        else:
            keys.append(path)
    return keys


def _record(sources: dict[str, str], keys: list[str], source: str) -> None:
    for key in keys:
        sources[key] = source


def flatten(settings: KvbmSettings) -> dict[str, Any]:
    """The settings as display keys -> values (tiers keyed by kind), for ``kvbm config show``."""
    dumped = settings.model_dump()
    out: dict[str, Any] = {}
    for key in _display_keys(dumped):
        node: Any = dumped
        parts = key.split(".")
        if parts[0] == "tiers":
            node = next(t for t in dumped["tiers"] if t["kind"] == parts[1])
            parts = parts[2:]
        for part in parts:
            node = node[part]
        out[key] = node
    return out
