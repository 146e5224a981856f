"""What ``kvbm bench`` leaves behind: the JSON document, the PNG plot and the printed summary.

The JSON holds every number of the summary, each request of both runs (user, round, lengths,
times, an output digest), the exact command line, the bench's knobs, the kvbm settings as resolved
(with each value's source, as ``kvbm config show --json`` prints them), the machine and device,
and the date. The plot shows the TTFT distribution and the mean TTFT per round of both runs, kvbm's
hit rates and its transfer bandwidth.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from kvbm_core.bench.collector import Flow
from kvbm_core.bench.environment import KvbmEnvironment
from kvbm_core.bench.runner import BenchResult, RequestRecord, RunRecord, machine_info
from kvbm_core.bench.summary import (
    OutputCheck,
    Ratios,
    RunSummary,
    compare_outputs,
    first_differences,
    mean_ttft_by_round,
    ratios,
    summarize,
    ttfts,
)
from kvbm_core.cli.config import report as settings_report
from kvbm_core.cli.table import render
from kvbm_core.registry import default_registry


class Report:
    """The figures of a :class:`BenchResult`, computed once."""

    def __init__(self, result: BenchResult, command: str, started: datetime):
        self.result = result
        self.command = command
        self.started = started
        self.baseline = summarize(result.baseline)
        self.kvbm = summarize(result.kvbm)
        self.ratios: Ratios = ratios(self.baseline, self.kvbm)
        self.outputs: OutputCheck = compare_outputs(result.baseline, result.kvbm)

    @property
    def stem(self) -> str:
        """File name stem: the preset and the profile the kvbm run used."""
        profile = self.result.kvbm.kvbm.environment.resolved.profile if self.result.kvbm.kvbm else None
        label = Path(profile).stem if profile else "env"
        return f"{self.result.config.preset}-{label}"

    # ------------------------------------------------------------------------------- JSON
    def document(self) -> dict[str, Any]:
        res = self.result
        cfg = res.config
        workload = cfg.workload()
        tpb = cfg.tokens_per_block
        workload_blocks = workload.users * (workload.max_sequence_tokens // tpb)
        assert res.kvbm.kvbm is not None
        env = res.kvbm.kvbm.environment
        return _finite(
            {
                "command": self.command,
                "date": self.started.isoformat(timespec="seconds"),
                "machine": machine_info(cfg.device, res.device_name),
                "preset": cfg.preset,
                "config": cfg.as_dict(),
                "engine": asdict(res.executor),
                "workload": {
                    "requests_per_run": workload.num_requests,
                    "max_prompt_tokens": workload.max_prompt_tokens,
                    "per_user_gap_s": workload.gap_s,
                    "ramp_up_s": workload.ramp_s,
                    "device_pool_blocks": cfg.num_device_blocks,
                    "workload_blocks": workload_blocks,
                    "device_pool_overflows": workload_blocks > cfg.num_device_blocks,
                },
                "kvbm_settings": {
                    "variables": env.variables,
                    "set_by_bench": env.set_by_bench,
                    "resolved": settings_report(env.resolved, default_registry()),
                },
                "baseline": self._run_doc(res.baseline, self.baseline),
                "kvbm": self._run_doc(res.kvbm, self.kvbm),
                "ratios": asdict(self.ratios),
                "outputs": {
                    "identical": self.outputs.identical,
                    "compared": self.outputs.compared,
                    "differences": [asdict(d) for d in self.outputs.differences],
                },
                "requests": {run.name: [_request_doc(r) for r in run.requests] for run in (res.baseline, res.kvbm)},
            }
        )

    @staticmethod
    def _run_doc(run: RunRecord, s: RunSummary) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "requests": s.requests,
            "ttft_s": asdict(s.ttft),
            "input_tokens": s.input_tokens,
            "output_tokens": s.output_tokens,
            "span_s": s.span_s,
            "input_tokens_per_s": s.input_tokens_per_s,
            "output_tokens_per_s": s.output_tokens_per_s,
            "requests_per_s": s.requests_per_s,
            "device_reused_tokens": s.device_reused_tokens,
            "connector_tokens": s.connector_tokens,
            "run_s": run.run_s,
            "warmup_s": run.warmup_s,
            "counters": asdict(run.counters),
        }
        if run.kvbm is not None:
            t = run.kvbm.transfers
            doc["hit_rates"] = {
                "host": t.host_hit_rate,
                "disk": t.disk_hit_rate,
                "queried_blocks": t.queried_blocks,
                "host_hit_blocks": t.host_hit_blocks,
                "disk_hit_blocks": t.disk_hit_blocks,
                "requests": t.requests,
            }
            doc["offload"] = {k: _flow_doc(f) for k, f in t.offload.items()}
            doc["onboard"] = {k: _flow_doc(f) for k, f in t.onboard.items()}
            stats = run.kvbm.stats
            if stats is not None:
                doc["leader_stats"] = {
                    "matched_tokens": stats.matched_tokens,
                    "requested_tokens": stats.requested_tokens,
                    "blocks": {route.label: n for route, n in stats.blocks.items()},
                    "host_hit_rate": stats.host_hit_rate,
                    "disk_hit_rate": stats.disk_hit_rate,
                    "failed_ops": stats.failed_ops,
                    "window_requests": stats.window_requests,
                }
        return doc

    def write_json(self, directory: Path) -> Path:
        path = directory / f"{self.stem}.json"
        path.write_text(json.dumps(self.document(), indent=2) + "\n")
        return path

    # ------------------------------------------------------------------------------- text
    def summary_text(self) -> str:
        res, b, k, q = self.result, self.baseline, self.kvbm, self.ratios
        cfg = res.config
        workload = cfg.workload()
        assert res.kvbm.kvbm is not None
        kv = res.kvbm.kvbm
        env = kv.environment
        qps = "inf (all at once)" if math.isinf(workload.qps) else f"{workload.qps:g}"
        lines = [
            f"kvbm bench: preset {cfg.preset}; model {cfg.model} on {cfg.device} ({res.device_name}); "
            f"{cfg.num_device_blocks} device blocks of {cfg.tokens_per_block} tokens",
            f"workload: {workload.users} users x {workload.rounds} rounds = {workload.num_requests} requests per run; "
            f"system {workload.system_tokens}, history {workload.history_tokens}, question "
            f"{workload.question_tokens}, answer {workload.answer_tokens} tokens; qps {qps}; seed {workload.seed}",
            f"kvbm: profile {env.resolved.profile or '(none)'}; {_pipeline_text(env)}",
            "",
        ]

        def ms(x: float) -> str:
            return f"{x * 1e3:.1f}"

        rows = [
            ("requests", b.requests, k.requests, ""),
            ("TTFT mean (ms)", ms(b.ttft.mean_s), ms(k.ttft.mean_s), _speedup(q.ttft_speedup_mean)),
            ("TTFT p50 (ms)", ms(b.ttft.p50_s), ms(k.ttft.p50_s), _speedup(q.ttft_speedup_p50)),
            ("TTFT p90 (ms)", ms(b.ttft.p90_s), ms(k.ttft.p90_s), _speedup(q.ttft_speedup_p90)),
            ("TTFT p99 (ms)", ms(b.ttft.p99_s), ms(k.ttft.p99_s), _speedup(q.ttft_speedup_p99)),
            ("input tokens/s", f"{b.input_tokens_per_s:.0f}", f"{k.input_tokens_per_s:.0f}",
             _times(q.input_throughput, "kvbm/baseline")),
            ("output tokens/s", f"{b.output_tokens_per_s:.1f}", f"{k.output_tokens_per_s:.1f}",
             _times(q.output_throughput, "kvbm/baseline")),
            ("span (s)", f"{b.span_s:.1f}", f"{k.span_s:.1f}", ""),
            ("prompt tokens reused on device", b.device_reused_tokens, k.device_reused_tokens, ""),
            ("prompt tokens loaded by kvbm", "-", k.connector_tokens, ""),
        ]
        lines.append(render(("", "baseline", "kvbm", "ratio"), rows))
        lines.append("")
        lines.append(f"TTFT speedup (baseline mean / kvbm mean): {_plain(q.ttft_speedup_mean, 'x')}; "
                     f"throughput ratio (kvbm / baseline output tokens/s): {_plain(q.output_throughput, '')}")
        t = kv.transfers
        lines.append(
            f"hit rates: host {t.host_hit_rate:.1%}, disk {t.disk_hit_rate:.1%} "
            f"({t.host_hit_blocks} + {t.disk_hit_blocks} of {t.queried_blocks} blocks looked up beyond the device)"
        )
        lines.append("offload: " + _flows_text(t.offload))
        lines.append("onboard: " + _flows_text(t.onboard))
        o = self.outputs
        if o.identical:
            lines.append(f"outputs identical: yes ({o.compared} requests, compared by user and round)")
        else:
            lines.append(f"outputs identical: NO - {len(o.differences)} of {o.compared} requests differ: "
                         f"{first_differences(o)}")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------- plot
    def write_plot(self, directory: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib.ticker import MaxNLocator

        res = self.result
        assert res.kvbm.kvbm is not None
        t = res.kvbm.kvbm.transfers
        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        colors = {"baseline": "tab:gray", "kvbm": "tab:blue"}
        ax = axes[0][0]
        for run in (res.baseline, res.kvbm):
            x = np.sort(np.asarray(ttfts(run)) * 1e3)
            ax.step(x, np.arange(1, len(x) + 1) / max(len(x), 1), where="post", label=run.name, color=colors[run.name])
        ax.set_xlabel("TTFT (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title("TTFT distribution")
        ax.legend()
        ax = axes[0][1]
        for run in (res.baseline, res.kvbm):
            by_round = mean_ttft_by_round(run)
            ax.plot(list(by_round), [v * 1e3 for v in by_round.values()], marker="o", label=run.name,
                    color=colors[run.name])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("mean TTFT (ms)")
        ax.set_title("TTFT by round")
        ax.legend()
        ax = axes[1][0]
        rates = [t.host_hit_rate * 100, t.disk_hit_rate * 100]
        ax.bar(["host", "disk"], rates, color=["tab:blue", "tab:orange"])
        ax.set_ylim(0, 100)
        ax.set_ylabel("% of looked-up blocks")
        ax.set_title("kvbm hit rates")
        ax = axes[1][1]
        labels, values = [], []
        for kind, flows in (("offload", t.offload), ("onboard", t.onboard)):
            for name, flow in flows.items():
                labels.append(f"{kind} {name}")
                values.append(flow.gb_per_s or 0.0)
        ax.bar(labels or ["(no transfers)"], values or [0.0], color="tab:green")
        ax.set_ylabel("GB/s")
        ax.set_title("kvbm transfer bandwidth")
        cfg = res.config
        fig.suptitle(f"kvbm bench {cfg.preset}: {cfg.model} on {res.device_name}, profile "
                     f"{res.kvbm.kvbm.environment.resolved.profile or '(none)'}; outputs identical: "
                     f"{'yes' if self.outputs.identical else 'NO'}")
        fig.tight_layout()
        path = directory / f"{self.stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _pipeline_text(env: KvbmEnvironment) -> str:
    tiers = ", ".join(
        f"{t.kind} " + (f"{t.num_blocks} blocks" if t.num_blocks is not None else f"{t.capacity_gb:g} GB")
        for t in env.resolved.settings.tiers
    )
    return f"tiers {tiers or '(none)'}"


def _speedup(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x faster" if x >= 1 else f"{1 / x:.2f}x slower"


def _plain(x: float | None, unit: str) -> str:
    return "-" if x is None else f"{x:.2f}{unit}" if unit else f"{x:.3f}"


def _times(x: float | None, what: str) -> str:
    return "-" if x is None else f"{x:.3f} {what}"


def _flows_text(flows: dict[str, Flow]) -> str:
    if not flows:
        return "none"
    parts = []
    for name, f in flows.items():
        rate = "-" if f.gb_per_s is None else f"{f.gb_per_s:.2f} GB/s"
        parts.append(f"{name} {rate} ({f.blocks} blocks, {f.bytes / 1e6:.1f} MB)")
    return "; ".join(parts)


def _flow_doc(f: Flow) -> dict[str, Any]:
    return {"ops": f.ops, "blocks": f.blocks, "bytes": f.bytes, "seconds": f.seconds, "gb_per_s": f.gb_per_s}


def _request_doc(r: RequestRecord) -> dict[str, Any]:
    return {
        "user": r.user,
        "round": r.round,
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": len(r.tokens),
        "arrival_s": r.arrival_s,
        "ttft_s": r.ttft_s,
        "finish_s": r.finish_s,
        "device_reused_tokens": r.device_reused_tokens,
        "connector_tokens": r.connector_tokens,
        "output_sha256": hashlib.sha256(",".join(map(str, r.tokens)).encode()).hexdigest()[:16],
    }


def _finite(value: Any) -> Any:
    """JSON has no infinity or NaN: infinite numbers become ``"inf"``, NaN becomes ``null``."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
