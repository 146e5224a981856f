"""``kvbm plugins``: every plugin found in the ``kvbm`` entry-point group and what it contributes.

It always lists everything installed: a broken plugin (an import that fails or exits, a misspelt
hook, a class that breaks its kind's contract, a name claimed twice) is listed as ``no (broken)``
with the reason in place of what it provides, and each broken plugin also gets one
``kvbm: error: plugin distribution '...': reason`` line on stderr.

Exit codes: 0 every enabled plugin loaded; 2 at least one is broken.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvbm_core.cli.table import render
from kvbm_core.registry import DISABLE_VARIABLE, Registry, default_registry

EXIT_OK, EXIT_BROKEN = 0, 2

_ENABLED = {"ok": "yes", "blocked": "no (blocked)", "broken": "no (broken)"}


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plugins",
        help="list installed plugins",
        description=f"List installed plugins: name, what they provide, distribution, version, enabled "
        f"(block one by name with {DISABLE_VARIABLE}=name1,name2). A broken plugin is listed with the "
        f"reason; the exit code is then {EXIT_BROKEN}.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def describe(registry: Registry) -> list[dict[str, Any]]:
    out = []
    for info in registry.plugins:
        provides = registry.contributions(info.name) if info.status == "ok" else {}
        out.append(
            {
                "name": info.name,
                "provides": provides,
                "distribution": info.distribution,
                "version": info.version,
                "module": info.module,
                "enabled": info.status == "ok",
                "status": info.status,
                "problem": info.problem,
            }
        )
    return out


def _provides_text(plugin: dict[str, Any]) -> str:
    if plugin["problem"]:
        return f"BROKEN: {plugin['problem']}"
    provides = plugin["provides"]
    parts = [f"{kind}: {', '.join(names)}" for kind, names in provides.items() if kind != "events"]
    if "events" in provides:
        parts.append(f"events ({len(provides['events'])} hooks)")
    return "; ".join(parts) or "-"


def run(args: argparse.Namespace) -> int:
    registry = default_registry()
    plugins = describe(registry)
    if args.json:
        print(json.dumps({"plugins": plugins}, indent=2))
    else:
        rows = [(p["name"], _provides_text(p), p["distribution"], p["version"], _ENABLED[p["status"]]) for p in plugins]
        print(render(("NAME", "PROVIDES", "DISTRIBUTION", "VERSION", "ENABLED"), rows))
    for problem in registry.problems:
        print(f"kvbm: error: {problem}", file=sys.stderr)
    return EXIT_BROKEN if registry.problems else EXIT_OK
