"""YAML profiles: bundled ones by name (``configs/profiles/<name>.yaml``) or any file by path.

The bundled profiles ship inside the package (``kvbm_core/configs`` is a link to the repository's
``configs/`` that setuptools copies into wheels), so a name works from a source checkout and from an
installed wheel alike. A missing file is an error, and so is a file that is not a YAML mapping; a
YAML syntax error is one line with its line and column.

Profiles are read with PyYAML's ``safe_load``, not pydantic-settings' ``YamlConfigSettingsSource``:
that source silently skips a missing file and reads a top-level list of pairs as a mapping, and
the layering (:mod:`kvbm_core.settings.resolve`) needs the file's own mapping to record which keys
it set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kvbm_core.errors import ConfigError

PROFILE_VARIABLE = "DYN_KVBM_PROFILE"


def configs_dir() -> Path:
    """The bundled configuration files (profiles, TRT-LLM and Prometheus examples)."""
    return Path(__file__).resolve().parents[1] / "configs"


def profiles_dir() -> Path:
    return configs_dir() / "profiles"


def bundled_profiles() -> list[str]:
    directory = profiles_dir()
    return sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []


def profile_path(name_or_path: str, source: str = PROFILE_VARIABLE) -> Path:
    """Resolve a bundled profile name or a file path; a :class:`ConfigError` naming ``source`` if absent.

    A value with a ``/`` or ending in ``.yaml``/``.yml`` is a path; anything else is a bundled name.
    """
    looks_like_path = "/" in name_or_path or name_or_path.endswith((".yaml", ".yml"))
    path = Path(name_or_path).expanduser() if looks_like_path else profiles_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        if looks_like_path:
            what = f"profile file {str(path)!r} " + ("is not a file" if path.exists() else "does not exist")
        else:
            what = f"no bundled profile {name_or_path!r}"
        raise ConfigError(source, what, ["a path to a .yaml file", *bundled_profiles()])
    return path


def load_profile(name_or_path: str, source: str = PROFILE_VARIABLE) -> tuple[str, dict[str, Any]]:
    """Return ``(label, data)``: the profile's display label (bundled name or path) and its YAML mapping."""
    path = profile_path(name_or_path, source)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, f"cannot read profile {str(path)!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {yaml_error_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "a profile must be a YAML mapping of settings")
    label = path.stem if path.resolve().parent == profiles_dir().resolve() else str(path)
    return label, data


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what is wrong, and where."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        return f"{where}{what}"
    return " ".join(str(exc).split())
