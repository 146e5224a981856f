"""``kvbm config show``: the resolved settings, the pipeline they describe, and each value's source;
``kvbm config path``: where the bundled configuration files are (profiles, TensorRT-LLM YAMLs,
Prometheus and Grafana files), so that an installed wheel's copies can be found and used.

Sources are ``default``, ``profile:<name or path>`` or ``env:<VARIABLE>``. ``--json`` prints one
object: ``profile``, ``profile_path``, ``pipeline``, ``tiers`` (each with ``kind``, ``level``,
``capacity_gb``, ``num_blocks``, ``options`` and ``sources`` per field), ``settings`` (every other
key as ``{"value", "source"}``) and ``notices`` (Dynamo variables kvbm does not read). A value that
means "the plugin decides" prints as what it means (``disk.directory``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from kvbm_core.cli.table import render
from kvbm_core.registry import Registry, default_registry
from kvbm_core.settings.pipeline import plan_pipeline
from kvbm_core.settings.profiles import configs_dir
from kvbm_core.settings.resolve import ResolvedSettings, flatten, resolve_settings

TIER_FIELDS = ("kind", "capacity_gb", "num_blocks", "options")
UNSET_MEANING = {"disk.directory": "(not set: the disk tier picks a private per-user directory)"}
"""Keys whose unset value (None) means something: printed as that meaning."""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("config", help="inspect the resolved configuration")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser(
        "show",
        help="print the resolved settings and where each value came from",
        description="Resolve defaults < profile < DYN_KVBM_* environment and print every value with its source.",
    )
    show.add_argument("--profile", help="bundled profile name or YAML path (instead of DYN_KVBM_PROFILE)")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=run_show)
    path = actions.add_parser(
        "path",
        help="print where the bundled profiles, TensorRT-LLM and Prometheus files are",
        description="Print the directory of the bundled configuration files and each file in it.",
    )
    path.add_argument("--json", action="store_true", help="print one JSON object")
    path.set_defaults(func=run_path)


def report(resolved: ResolvedSettings, registry: Registry) -> dict[str, Any]:
    """The JSON document of ``kvbm config show --json``."""
    settings = resolved.settings
    plan = plan_pipeline(settings, registry)
    tier_types = registry.types("tier")
    tiers = []
    for spec in settings.tiers:
        tier: dict[str, Any] = spec.model_dump()
        tier["level"] = tier_types[spec.kind].cls.level.name.lower()
        tier["distribution"] = tier_types[spec.kind].distribution
        tier["sources"] = {f: resolved.source_of(f"tiers.{spec.kind}.{f}") for f in TIER_FIELDS}
        tiers.append(tier)
    values = {
        key: {"value": value, "source": resolved.source_of(key)}
        for key, value in flatten(settings).items()
        if not key.startswith("tiers.")
    }
    return {
        "profile": resolved.profile,
        "profile_path": str(resolved.profile_path) if resolved.profile_path else None,
        "pipeline": {
            "shape": plan.shape,
            "offload": [r.label for r in plan.offload],
            "onboard": [r.label for r in plan.onboard],
            "disk_filter": plan.disk_filter,
            "description": plan.describe(),
        },
        "tiers": tiers,
        "settings": values,
        "notices": list(resolved.notices),
    }


def run_show(args: argparse.Namespace) -> int:
    registry = default_registry()
    doc = report(resolve_settings(profile=args.profile, registry=registry, log_notices=False), registry)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    profile = doc["profile"] or "(none: defaults and environment only)"
    print(f"profile   {profile}")
    print(f"pipeline  {doc['pipeline']['description']}")
    for notice in doc["notices"]:
        print(f"notice    {notice}")
    print()
    rows = []
    for tier in doc["tiers"]:
        for f in TIER_FIELDS:
            rows.append((f"tiers.{tier['kind']}.{f}", _text(tier[f]), tier["sources"][f]))
    rows += [(key, _text(v["value"], key), v["source"]) for key, v in doc["settings"].items()]
    print(render(("KEY", "VALUE", "SOURCE"), rows))
    return 0


def run_path(args: argparse.Namespace) -> int:
    root = configs_dir()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if args.json:
        print(json.dumps({"configs": str(root), "files": {str(p.relative_to(root)): str(p) for p in files}}, indent=2))
        return 0
    print(f"configs   {root}")
    print()
    print(render(("FILE", "PATH"), [(str(p.relative_to(root)), str(p)) for p in files]))
    return 0


def _text(value: Any, key: str = "") -> str:
    if value is None:
        return UNSET_MEANING.get(key, "-")
    if isinstance(value, (dict, list, bool)):
        return json.dumps(value)
    return str(value)
