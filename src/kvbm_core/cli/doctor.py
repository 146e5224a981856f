"""``kvbm doctor``: checks this machine against the resolved configuration, as the engine would.

Rows come from, in order: the configuration itself (no tier: the connector refuses to start),
notices (Dynamo variables kvbm does not read), TensorRT-LLM (installed, version, connector module),
the LLM-API YAML given with ``--llm-api-config`` (the connector's own engine checks,
:mod:`kvbm_core.trtllm.engine_checks`), CUDA, host memory and pinned allocation (host tier), the
generic disk checks (disk-level tier: directory, free space, O_DIRECT, fallocate), each configured
tier's ``StorageTier.diagnose`` (for example the GDS tier's kvikio mode), each configured
transport's ``Transport.diagnose`` (etcd/NATS reachable) and the metrics port.

A row fails exactly where the engine would refuse to start, and warns where it would start in a
degraded way. Each check is printed once: a plugin row with the name of a row already printed
(the disk tier checking its directory again) is the same check and is dropped. Doctor changes
nothing on the machine; its probe files are removed.

Exit code: 0 when every row passes or warns, 1 when any fails, 2 when the configuration itself is
invalid (printed as one line by :mod:`kvbm_core.cli.main`).
"""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kvbm_core.cli import machine
from kvbm_core.cli.table import render
from kvbm_core.errors import ConfigError
from kvbm_core.interfaces import CheckResult
from kvbm_core.registry import Registry, default_registry
from kvbm_core.settings.pipeline import NO_TIER_HINT, plan_pipeline
from kvbm_core.settings.profiles import yaml_error_line
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
    parser.add_argument("--llm-api-config", metavar="FILE", type=Path,
                        help="also check a TensorRT-LLM LLM-API YAML (what trtllm-serve --extra_llm_api_options reads)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def diagnose(resolved: ResolvedSettings, registry: Registry, llm_api_config: Path | None = None) -> list[CheckResult]:
    """Every row of the report, in order, each check once."""
    rows = _diagnose(resolved, registry, llm_api_config)
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row.name not in seen:
            seen.add(row.name)
            unique.append(row)
    return unique


def _diagnose(resolved: ResolvedSettings, registry: Registry, llm_api_config: Path | None) -> list[CheckResult]:
    settings = resolved.settings
    plan = plan_pipeline(settings, registry)
    where = f"profile {resolved.profile}" if resolved.profile else "defaults and environment"
    if plan.shape == "none":
        rows = [CheckResult("configuration", machine.FAIL, f"{where}: no KV cache tier: the connector refuses to start ({NO_TIER_HINT})")]
    else:
        rows = [CheckResult("configuration", machine.PASS, f"{where}: {plan.describe()}")]
    rows += [CheckResult(notice.split()[0], machine.WARN, notice) for notice in resolved.notices]
    rows.append(machine.trtllm())
    if llm_api_config is not None:
        rows += llm_api_rows(llm_api_config)
    cuda_rows, cuda_ok = machine.cuda()
    rows += cuda_rows
    if plan.host is not None:
        rows += machine.host_memory(plan.host, cuda_ok)
    if plan.disk is not None:
        rows += machine.disk(plan.disk, settings)
    tier_types = registry.types("tier")
    for spec in settings.tiers:
        entry = tier_types[spec.kind]
        if spec is plan.disk and not machine.disk_directory_exists(spec, settings):
            continue  # a tier's own probes need its directory, which only the engine may create
        rows += _guarded(f"tier {spec.kind}", entry.distribution, lambda: entry.cls.diagnose(spec, settings))
    transport_types = registry.types("transport")
    for name in settings.transports:
        entry = transport_types[name]
        rows += _guarded(f"transport {name}", entry.distribution, lambda: entry.cls.diagnose(settings))
    if settings.metrics.enabled:
        rows.append(_metrics_port(settings.metrics.host, settings.metrics.port))
    return rows


def llm_api_rows(path: Path) -> list[CheckResult]:
    """The connector's engine checks on an LLM-API YAML; a file that cannot be read is a configuration error."""
    from kvbm_core.trtllm.engine_checks import engine_findings

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError("--llm-api-config", f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {yaml_error_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "an LLM-API config must be a YAML mapping")
    rows = []
    for finding in engine_findings(data):
        accepted = f" (accepted: {finding.accepted})" if finding.status != machine.PASS and finding.accepted else ""
        rows.append(CheckResult(f"llm-api {finding.key}", finding.status, finding.detail + accepted))
    return rows


def exit_code(rows: list[CheckResult]) -> int:
    return 1 if any(r.status == machine.FAIL for r in rows) else 0


def run(args: argparse.Namespace) -> int:
    registry = default_registry()
    rows = diagnose(resolve_settings(profile=args.profile, registry=registry, log_notices=False), registry, args.llm_api_config)
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


def _metrics_port(host: str, port: int) -> CheckResult:
    """The engine keeps serving without metrics when it cannot bind, so a busy port warns."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            return CheckResult("metrics port", machine.WARN, f"{host}:{port} cannot be bound ({exc.strerror}): the engine serves "
                               "without metrics; set DYN_KVBM_METRICS_PORT or DYN_KVBM_METRICS_HOST")
    return CheckResult("metrics port", machine.PASS, f"{host}:{port} is free")
