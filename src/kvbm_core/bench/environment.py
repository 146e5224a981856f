"""The ``DYN_KVBM_*`` environment of the bench's kvbm run, set the way a user sets it.

kvbm's connector reads its settings from the process environment when the engine builds it, so
the bench puts its choices there for the kvbm run only and restores the environment afterwards:

- **Profile**: ``--profile`` if given, else ``DYN_KVBM_PROFILE`` if set, else the preset's profile.
- **Preset sizes** (for example ``DYN_KVBM_CPU_CACHE_GB`` of the ``embedded`` preset) apply only
  with the preset's own profile, and only to variables that are not set: with a profile of your
  choosing kvbm runs exactly as that profile and your variables say.
- **Disk directory**: when the pipeline has a disk-level tier and neither ``DYN_KVBM_DISK_CACHE_DIR``
  nor the profile names a directory, a temporary directory created for the run and removed after it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from kvbm_core.interfaces import TierLevel
from kvbm_core.registry import Registry
from kvbm_core.settings.environment import PREFIX
from kvbm_core.settings.profiles import PROFILE_VARIABLE
from kvbm_core.settings.resolve import DEFAULT, ResolvedSettings, resolve_settings

DISK_DIR_VARIABLE = "DYN_KVBM_DISK_CACHE_DIR"


@dataclass(frozen=True)
class KvbmEnvironment:
    """What the kvbm run saw: every ``DYN_KVBM_*`` variable, which of them the bench set and why,
    and the settings they resolve to."""

    variables: dict[str, str]
    set_by_bench: dict[str, str]  # variable -> reason
    resolved: ResolvedSettings
    temporary_disk_dir: str | None


def _is_set(environ: Mapping[str, str], name: str) -> bool:
    return bool(environ.get(name))  # an empty variable counts as unset, as everywhere in kvbm


def _has_disk_tier(resolved: ResolvedSettings, registry: Registry) -> bool:
    types = registry.types("tier")
    return any(types[t.kind].cls.level == TierLevel.DISK for t in resolved.settings.tiers)


@contextmanager
def kvbm_environment(
    registry: Registry,
    profile_flag: str | None,
    preset: str,
    preset_profile: str,
    preset_variables: Mapping[str, str],
) -> Iterator[KvbmEnvironment]:
    """Set the kvbm run's variables in ``os.environ`` for the duration of the ``with`` block."""
    base = dict(os.environ)
    overlay: dict[str, str] = {}
    reasons: dict[str, str] = {}
    if profile_flag:
        overlay[PROFILE_VARIABLE], reasons[PROFILE_VARIABLE] = profile_flag, "--profile"
    elif not _is_set(base, PROFILE_VARIABLE):
        overlay[PROFILE_VARIABLE], reasons[PROFILE_VARIABLE] = preset_profile, f"preset {preset}"
        for name, value in preset_variables.items():
            if not _is_set(base, name):
                overlay[name], reasons[name] = value, f"preset {preset}"
    resolved = resolve_settings(environ={**base, **overlay}, registry=registry)
    temporary = None
    if _has_disk_tier(resolved, registry) and resolved.source_of("disk.directory") == DEFAULT:
        temporary = tempfile.mkdtemp(prefix="kvbm-bench-")
        overlay[DISK_DIR_VARIABLE], reasons[DISK_DIR_VARIABLE] = temporary, "temporary directory of this run"
        resolved = resolve_settings(environ={**base, **overlay}, registry=registry)
    saved = {name: os.environ.get(name) for name in overlay}
    os.environ.update(overlay)
    try:
        variables = {k: v for k, v in sorted(os.environ.items()) if k.startswith(PREFIX) and v}
        yield KvbmEnvironment(variables, reasons, resolved, temporary)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
