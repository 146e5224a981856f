"""``kvbm doctor``: checks this machine against the resolved configuration.

Rows come from, in order: the configuration itself, CUDA, host memory and pinned allocation (host
tier), the generic disk checks (disk-level tier: directory, free space, O_DIRECT, fallocate), each
configured tier's ``StorageTier.diagnose`` (for example the GDS tier's kvikio mode), each configured
transport's ``Transport.diagnose`` (etcd/NATS reachable) and the metrics port.

Exit code: 0 when every row passes or warns, 1 when any fails, 2 when the configuration itself is
invalid (printed as one line by :mod:`kvbm_core.cli.main`).
"""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Callable
from typing import Any

from kvbm_core.cli import machine
from kvbm_core.cli.table import render
from kvbm_core.interfaces import CheckResult
from kvbm_core.registry import Registry, default_registry
from kvbm_core.settings.pipeline import plan_pipeline
from kvbm_core.settings.resolve import ResolvedSettings, resolve_settings

STATUSES = (machine.PASS, machine.WARN, machine.FAIL)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check this machine against the configuration",
        description="Check CUDA, pinned memory, the disk tier's directory, tier plugins and cluster servers. "
        "Exit 0: all pass or warn; 1: a check failed; 2: the configuration is invalid.",
    )
    parser.add_argument("--profile", help="bundled profile name or YAML path (instead of DYN_KVBM_PROFILE)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def diagnose(resolved: ResolvedSettings, registry: Registry) -> list[CheckResult]:
    """Every row of the report, in order."""
    settings = resolved.settings
    plan = plan_pipeline(settings, registry)
    where = f"profile {resolved.profile}" if resolved.profile else "defaults and environment"
    rows = [CheckResult("configuration", machine.WARN if plan.shape == "none" else machine.PASS, f"{where}: {plan.describe()}")]
    cuda_rows, cuda_ok = machine.cuda()
    rows += cuda_rows
    if plan.host is not None:
        rows += machine.host_memory(plan.host, cuda_ok)
    if plan.disk is not None:
        rows += machine.disk(plan.disk, settings)
    tier_types = registry.types("tier")
    for spec in settings.tiers:
        entry = tier_types[spec.kind]
        rows += _guarded(f"tier {spec.kind}", entry.distribution, lambda: entry.cls.diagnose(spec, settings))
    transport_types = registry.types("transport")
    for name in settings.transports:
        entry = transport_types[name]
        rows += _guarded(f"transport {name}", entry.distribution, lambda: entry.cls.diagnose(settings))
    if settings.metrics.enabled:
        rows.append(_metrics_port(settings.metrics.port))
    return rows


def exit_code(rows: list[CheckResult]) -> int:
    return 1 if any(r.status == machine.FAIL for r in rows) else 0


def run(args: argparse.Namespace) -> int:
    registry = default_registry()
    rows = diagnose(resolve_settings(profile=args.profile, registry=registry), registry)
    code = exit_code(rows)
    if args.json:
        print(json.dumps({"checks": [r.__dict__ for r in rows], "exit_code": code}, indent=2))
        return code
    print(render(("CHECK", "STATUS", "DETAIL"), [(r.name, r.status.upper(), r.detail) for r in rows]))
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    print(f"\n{counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail")
    return code


def _guarded(name: str, distribution: str, check: Callable[[], list[CheckResult]]) -> list[CheckResult]:
    """A plugin's diagnose() that raises, or returns something else than rows, is one failed row."""
    try:
        rows = list(check())
    except Exception as exc:
        return [CheckResult(name, machine.FAIL, f"diagnose() of distribution {distribution!r} raised {exc!r}")]
    bad = [r for r in rows if not isinstance(r, CheckResult) or r.status not in STATUSES]
    if bad:
        return [CheckResult(name, machine.FAIL, f"diagnose() of distribution {distribution!r} returned {bad[0]!r}")]
    return rows


def _metrics_port(port: int) -> CheckResult:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError as exc:
            return CheckResult("metrics port", machine.WARN, f"{port} is in use ({exc.strerror}): set DYN_KVBM_METRICS_PORT to a free port")
    return CheckResult("metrics port", machine.PASS, f"{port} is free")
