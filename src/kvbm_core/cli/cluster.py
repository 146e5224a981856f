"""``kvbm cluster``: the live kvbm instances registered in etcd.

Each engine whose profile lists the ``etcd`` transport keeps a record under
``<prefix>instances/`` while it lives (:mod:`kvbm_core.cluster.registration`); this command reads
them from the etcd of the resolved settings (``--profile``, ``DYN_KVBM_PROFILE``;
``transport_options.etcd``), or from ``--endpoint``.

Exit codes: 0 the instances were listed (none is a valid answer); 1 etcd did not answer;
2 a configuration error (printed as one line by :mod:`kvbm_core.cli.main`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvbm_core.cli.table import render
from kvbm_core.cluster.instance import INSTANCES
from kvbm_core.errors import ConfigError, TransportError
from kvbm_core.registry import default_registry
from kvbm_core.settings.model import KvbmSettings
from kvbm_core.settings.resolve import resolve_settings
from kvbm_core.transports import EtcdTransport
from kvbm_core.transports.etcd import DEFAULT_PORT, EtcdOptions, etcd_options
from kvbm_core.transports.options import split_address

EXIT_OK, EXIT_UNREACHABLE = 0, 1


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cluster",
        help="list the live kvbm instances registered in etcd",
        description="List the kvbm instances registered in etcd (profiles with the etcd transport). "
        "Exit 0: listed; 1: etcd did not answer; 2: the configuration is invalid.",
    )
    parser.add_argument("--profile", help="bundled profile name or YAML path (instead of DYN_KVBM_PROFILE)")
    parser.add_argument("--endpoint", action="append", metavar="URL",
                        help="etcd endpoint (http://HOST:PORT), instead of transport_options.etcd.endpoints; repeatable")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def options_for(args: argparse.Namespace) -> EtcdOptions:
    settings = resolve_settings(profile=args.profile, registry=default_registry(), log_notices=False).settings
    options = etcd_options(settings)
    for endpoint in args.endpoint or ():
        try:
            split_address(endpoint, ("http",), DEFAULT_PORT)
        except ValueError as exc:
            raise ConfigError("--endpoint", str(exc), "http://HOST:PORT") from None
    return options.model_copy(update={"endpoints": list(args.endpoint)}) if args.endpoint else options


def read_instances(options: EtcdOptions) -> tuple[list[dict[str, Any]], list[str]]:
    """The records under ``instances/``, by worker id, and the keys whose value is not a record."""
    transport = EtcdTransport(KvbmSettings(transports=["etcd"], transport_options={"etcd": options.model_dump()}))
    try:
        found = transport.get_prefix(INSTANCES)
    finally:
        transport.close()
    records, unreadable = [], []
    for key, value in sorted(found.items()):
        try:
            record = json.loads(value)
            if not isinstance(record, dict) or "worker_id" not in record:
                raise ValueError("not an instance record")
            records.append(record)
        except ValueError:
            unreadable.append(key)
    return records, unreadable


def _tiers(record: dict[str, Any]) -> str:
    return ", ".join(f"{t['kind']} {t['num_slots']} blocks" for t in record.get("tiers", [])) or "-"


def run(args: argparse.Namespace) -> int:
    options = options_for(args)
    try:
        records, unreadable = read_instances(options)
    except TransportError as exc:
        print(f"kvbm: error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps({"endpoints": options.endpoints, "prefix": options.prefix, "instances": records,
                          "unreadable": unreadable}, indent=2))
        return EXIT_OK
    if not records:
        print(f"no live kvbm instance registered under {options.prefix}{INSTANCES} ({', '.join(options.endpoints)})")
    else:
        rows = [(f"{r['worker_id']:016x}", f"{r.get('host')}:{r.get('pid')}", r.get("model") or "-", _tiers(r),
                 r.get("metrics") or "-", (r.get("kv_events") or {}).get("subject", "-"), r.get("started_at", "-"))
                for r in records]
        print(render(("WORKER", "HOST:PID", "MODEL", "TIERS", "METRICS", "KV EVENTS", "SINCE"), rows))
    for key in unreadable:
        print(f"kvbm: warning: {options.prefix}{key} is not an instance record", file=sys.stderr)
    return EXIT_OK
