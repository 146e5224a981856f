"""YAML profiles: bundled ones by name (``configs/profiles/<name>.yaml``) or any file by path.

A missing file is an error (pydantic-settings would silently ignore one), and so is a file that is
not a YAML mapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kvbm_core.errors import ConfigError

PROFILE_VARIABLE = "DYN_KVBM_PROFILE"


def profiles_dir() -> Path:
    """The bundled profiles: ``configs/profiles`` of the source tree kvbm is installed from."""
    return Path(__file__).resolve().parents[3] / "configs" / "profiles"


def bundled_profiles() -> list[str]:
    directory = profiles_dir()
    return sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []


def profile_path(name_or_path: str, source: str = PROFILE_VARIABLE) -> Path:
    """Resolve a bundled profile name or a file path; a :class:`ConfigError` naming ``source`` if absent."""
    looks_like_path = "/" in name_or_path or name_or_path.endswith((".yaml", ".yml"))
    path = Path(name_or_path).expanduser() if looks_like_path else profiles_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        what = f"profile file {str(path)!r} does not exist" if looks_like_path else f"no bundled profile {name_or_path!r}"
        raise ConfigError(source, what, ["a path to a .yaml file", *bundled_profiles()])
    return path


def load_profile(name_or_path: str, source: str = PROFILE_VARIABLE) -> tuple[str, dict[str, Any]]:
    """Return ``(label, data)``: the profile's display label and its YAML mapping."""
    path = profile_path(name_or_path, source)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "a profile must be a YAML mapping of settings")
    label = path.stem if path.parent == profiles_dir() else str(path)
    return label, data
