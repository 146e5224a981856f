"""``kvbm plugins``: every plugin found in the ``kvbm`` entry-point group and what it contributes."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kvbm_core.cli.table import render
from kvbm_core.registry import DISABLE_VARIABLE, Registry, default_registry


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plugins",
        help="list installed plugins",
        description=f"List installed plugins: name, what they provide, distribution, version, enabled "
        f"(block one by name with {DISABLE_VARIABLE}=name1,name2).",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def describe(registry: Registry) -> list[dict[str, Any]]:
    out = []
    for info in registry.plugins:
        provides = registry.contributions(info.name) if info.enabled else {}
        out.append(
            {
                "name": info.name,
                "provides": provides,
                "distribution": info.distribution,
                "version": info.version,
                "module": info.module,
                "enabled": info.enabled,
            }
        )
    return out


def _provides_text(provides: dict[str, list[str]]) -> str:
    parts = [f"{kind}: {', '.join(names)}" for kind, names in provides.items() if kind != "events"]
    if "events" in provides:
        parts.append(f"events ({len(provides['events'])} hooks)")
    return "; ".join(parts) or "-"


def run(args: argparse.Namespace) -> int:
    plugins = describe(default_registry())
    if args.json:
        print(json.dumps({"plugins": plugins}, indent=2))
        return 0
    rows = [
        (p["name"], _provides_text(p["provides"]), p["distribution"], p["version"], "yes" if p["enabled"] else "no (blocked)")
        for p in plugins
    ]
    print(render(("NAME", "PROVIDES", "DISTRIBUTION", "VERSION", "ENABLED"), rows))
    return 0
