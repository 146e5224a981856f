"""``kvbm bench``: a multi-round QA workload on the reference executor, without and with kvbm.

Every knob of :class:`~kvbm_core.bench.BenchConfig` has a flag; a flag left out takes the
preset's value. Writes ``<preset>-<profile>.json`` and ``.png`` to ``--out`` and prints the summary.

Exit codes: 0 outputs identical; 1 outputs differ between the two runs (the files are still
written); 2 a configuration error, or a kvbm tier too large for this machine (one line on stderr).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_OUTPUTS_DIFFER = 0, 1

_KNOBS = (
    ("--model", str, "reference model shape: tiny, qwen3-0.6b, llama-3-8b"),
    ("--device", str, "cpu, cuda or cuda:N"),
    ("--num-device-blocks", int, "blocks in the device KV pool (make it smaller than the workload)"),
    ("--tokens-per-block", int, "tokens per KV block (a power of two)"),
    ("--max-batch-size", int, "requests per forward pass"),
    ("--max-num-tokens", int, "tokens per forward pass (default: the longest prompt, at least 8192)"),
    ("--users", int, "concurrent users (sessions)"),
    ("--rounds", int, "requests per user"),
    ("--system-tokens", int, "shared system prompt length"),
    ("--history-tokens", int, "per-user history length"),
    ("--question-tokens", int, "tokens of each round's new question"),
    ("--answer-tokens", int, "tokens generated per request"),
    ("--qps", float, "offered requests per second ('inf': all at once); per-user gap = users / qps"),
    ("--ramp-up-s", float, "users join evenly over this many seconds (default: one per-user gap)"),
    ("--seed", int, "seed of the token ids and the model weights"),
    ("--threads", int, "torch CPU threads (default on CPU: 1, fastest for the tiny model)"),
    ("--model-mode", str, "reference model arithmetic: exact, batch_invariant, fast (default: exact on CPU, "
     "fast on CUDA)"),
)


def add_parser(subparsers: Any) -> None:
    from kvbm_core.bench.presets import DEFAULT_PRESET, PRESETS

    presets = "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items())
    parser = subparsers.add_parser(
        "bench",
        help="benchmark kvbm: multi-round QA with and without kvbm, outputs compared",
        description="Run a multi-round QA workload on the reference executor twice, without and with kvbm, "
        "check that every output is identical and report TTFT, throughput, hit rates and bandwidth. "
        f"Presets - {presets}. Exit 0: outputs identical; 1: outputs differ; 2: configuration error.",
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="default: %(default)s")
    parser.add_argument("--profile", help="kvbm profile name or YAML path (instead of DYN_KVBM_PROFILE "
                        "and the preset's profile)")
    parser.add_argument("--out", default="bench-out", help="directory for the JSON and PNG (default: %(default)s)")
    for flag, kind, text in _KNOBS:
        parser.add_argument(flag, type=kind, help=text)
    parser.add_argument("--chunked-prefill", action="store_true", default=None, help="split long prompts")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", default=None,
                        help="skip the warm-up requests")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvbm_core.bench import build_config
    from kvbm_core.errors import ConfigError, StorageError
    from kvbm_core.bench.report import Report
    from kvbm_core.bench.runner import run_bench

    overrides = {flag.lstrip("-").replace("-", "_"): None for flag, _, _ in _KNOBS}
    overrides = {name: getattr(args, name) for name in overrides}
    overrides.update(chunked_prefill=args.chunked_prefill, warmup=args.warmup, profile=args.profile)
    config = build_config(args.preset, overrides)
    started = datetime.now(timezone.utc)
    try:
        result = run_bench(config, progress=args.progress)
    except StorageError as exc:  # a tier that cannot be allocated here: sized too large for this machine
        raise ConfigError(
            "kvbm tier size", f"{exc}", ["DYN_KVBM_CPU_CACHE_GB", "DYN_KVBM_DISK_CACHE_GB", "--profile"]
        ) from exc
    command = shlex.join(["kvbm", *getattr(args, "argv", sys.argv[1:])])
    report = Report(result, command, started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = report.write_json(out)
    png_path = report.write_plot(out)
    print(report.summary_text())
    print(f"wrote {json_path} and {png_path}", flush=True)
    if not report.outputs.identical:
        print(
            "kvbm bench: outputs differ between the baseline and the kvbm run "
            f"({len(report.outputs.differences)} of {report.outputs.compared} requests); see 'outputs' in {json_path}",
            file=sys.stderr,
        )
        return EXIT_OUTPUTS_DIFFER
    return EXIT_OK
