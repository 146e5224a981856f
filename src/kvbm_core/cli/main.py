"""Entry point of the ``kvbm`` console script: parses arguments and maps errors to exit codes.

Exit codes: 0 success; 1 a check failed (``kvbm doctor``; ``kvbm bench``: outputs differ); 2 a
configuration or plugin error, printed as one line on stderr without a traceback (one JSON object
with ``DYN_KVBM_LOG_FORMAT=json``). Output piped into a reader that stops early (``| head``) ends
quietly: the rest is discarded, without a ``BrokenPipeError`` traceback.

Each subcommand is a module with ``add_parser(subparsers)`` (which sets ``func``, a callable taking
the parsed arguments and returning the exit code). Adding one (``kvbm bench``) means writing its
module and listing it in :data:`COMMANDS`. Commands that depend on optional packages (``kvbm bench``:
matplotlib, tqdm) import them when they run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

from kvbm_core import __version__
from kvbm_core.cli import bench, cluster, config, doctor, plugins
from kvbm_core.errors import ConfigError, PluginError
from kvbm_core.logging import configure
from kvbm_core.settings.environment import SeedEnvironment
from kvbm_core.settings.model import LoggingSettings

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2

COMMANDS = (plugins, config, doctor, bench, cluster)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbm", description="KV-cache block manager for TensorRT-LLM.")
    parser.add_argument("--version", action="version", version=f"kvbm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for reports
    json_errors = False
    try:
        env = SeedEnvironment.load()
        json_errors = env.log_format == "json"
        configure(LoggingSettings(format=env.log_format or "console", level=env.log_level or "info"))
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except (ConfigError, PluginError) as exc:
        _error(exc, json_errors)
        return EXIT_CONFIG
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


def _error(exc: Exception, as_json: bool) -> None:
    if as_json:
        record = {"event": f"kvbm: error: {exc}", "level": "error", "logger": "kvbm.cli",
                  "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")}
        print(json.dumps(record), file=sys.stderr)
    else:
        print(f"kvbm: error: {exc}", file=sys.stderr)


def _discard_stdout() -> None:
    """The reader closed the pipe: send what is still buffered nowhere, so exiting prints nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
