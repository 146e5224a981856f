"""Leader CPU time: matching a long prompt against a full host tier, and one decode step at scale.

Plain script (no GPU, no torch)::

    python benchmarks/leader_bench.py --out bench-out/leader_bench.json

Scenarios (defaults are the targets' sizes; ``--quick`` shrinks them for a smoke run):

- ``match``: a 20k-token prompt (625 blocks of 32 tokens, a Python list as TRT-LLM hands it over)
  matched against a host tier holding 100k registered blocks, the whole prompt present (the worst
  case: every block hashed, looked up and pinned). Each sample is a fresh request; its finish is not
  timed. Also a prompt that misses (hash + lookup only) and the same prompt given as a numpy array.
- ``schedule``: one ``schedule()`` call with 256 running decode requests (one new token each, new
  block ids at boundaries, write-through stores of the blocks that fill), results applied between
  steps (timed separately).

Targets: <= 300 us per 20k-token match and <= 1 ms per step at 256 requests, in leader **CPU time**
(``time.thread_time``: what the leader thread itself spends, not time it was preempted by other
processes on a shared machine). Wall-clock figures are reported alongside.

On a shared machine other processes also slow the leader's own instructions (caches, memory
bandwidth), in bursts of seconds. Each scenario is therefore sampled in ``--rounds`` interleaved
rounds; the report gives the median over all samples and the median of the quietest round
(``best round``), which approximates an undisturbed machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvbm_core.layout import BlockLayout
from kvbm_core.leader import BlockManager
from kvbm_core.ops import OpResult
from kvbm_core.registry import Registry
from kvbm_core.settings.model import KvbmSettings

TPB = 32


@dataclass
class Report:
    """A ``RequestData`` as TRT-LLM builds it."""

    request_id: int
    new_tokens: list[int]
    new_block_ids: list[int]
    computed_position: int
    num_scheduled_tokens: int


class Timer:
    """Collects CPU-time and wall-time samples of a code section, grouped in rounds."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self.round_medians: list[float] = []
        self._round_start = 0

    def end_round(self) -> None:
        samples = self.cpu[self._round_start :]
        if samples:
            self.round_medians.append(statistics.median(samples) * 1e6)
        self._round_start = len(self.cpu)

    def __enter__(self) -> "Timer":
        self._c, self._w = time.thread_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu.append(time.thread_time() - self._c)
        self.wall.append(time.perf_counter() - self._w)

    def summary(self) -> dict:
        self.end_round()
        return {"cpu": summary(self.cpu), "wall": summary(self.wall),
                "cpu_best_round_median_us": min(self.round_medians), "cpu_round_medians_us": self.round_medians}


def summary(samples_s: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in samples_s)
    return {
        "n": len(us),
        "median_us": statistics.median(us),
        "mean_us": statistics.fmean(us),
        "p10_us": us[len(us) // 10],
        "p90_us": us[(9 * len(us)) // 10],
        "min_us": us[0],
        "max_us": us[-1],
    }


def make_manager(host_blocks: int) -> BlockManager:
    settings = KvbmSettings.model_validate({"tiers": [{"kind": "cpu", "num_blocks": host_blocks}]})
    layout = BlockLayout(num_layers=28, kv_factor=2, elems_per_block=8 * 128 * TPB, dtype="bfloat16", tokens_per_block=TPB)
    return BlockManager(settings, layout, world_size=1, model_id="bench/llama-8b-shape", registry=Registry())


def ok_results(ops) -> list[OpResult]:
    return [OpResult(int(i), True, num_bytes=1, seconds=1e-3) for i in ops.op_ids.tolist()]


def fill_host(bm: BlockManager, prompts: list[list[int]], first_id: int) -> int:
    """Store every full block of ``prompts`` through the real path (prefill, stores, results)."""
    rid = first_id
    device_ids = list(range(1 + max(len(p) for p in prompts) // TPB))
    for prompt in prompts:
        bm.match(rid, prompt, 0)
        blocks = device_ids[: -(-len(prompt) // TPB)]
        bm.allocated(rid, blocks)
        ops = bm.schedule([Report(rid, prompt, blocks, 0, len(prompt))], [])
        bm.apply_results(ok_results(ops))
        bm.finish(rid)
        rid += 1
    return rid


def bench_match(args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    prompt_len = args.prompt_tokens
    n_prompts = max(1, args.host_blocks // (prompt_len // TPB))
    bm = make_manager(args.host_blocks + 1024)
    prompts = [[rng.randrange(150_000) for _ in range(prompt_len)] for _ in range(n_prompts)]
    rid = fill_host(bm, prompts, 1)
    registered = len(bm.host)
    out = {"registered_blocks": registered, "prompt_tokens": prompt_len}
    hit_prompt = prompts[len(prompts) // 2]
    miss_prompt = [rng.randrange(150_000) for _ in range(prompt_len)]
    scenarios = {"hit_list": hit_prompt, "miss_list": miss_prompt, "hit_ndarray": np.array(hit_prompt)}
    timers = {label: Timer() for label in scenarios}
    matched = {}
    for _ in range(args.rounds):
        for label, prompt in scenarios.items():
            timer = timers[label]
            for _ in range(max(1, args.repeat // args.rounds)):
                with timer:
                    m = bm.match(rid, prompt, 0)
                bm.finish(rid)
                rid += 1
            timer.end_round()
            matched[label] = m.num_tokens
    for label, timer in timers.items():
        out[label] = {**timer.summary(), "matched_tokens": matched[label]}
    return out


def bench_schedule(args: argparse.Namespace) -> dict:
    rng = random.Random(1)
    n = args.requests
    bm = make_manager(args.host_blocks)
    free = list(range(1_000_000))
    state = {}
    for rid in range(n):
        prompt = [rng.randrange(150_000) for _ in range(rng.randint(args.decode_prompt // 2, args.decode_prompt))]
        bm.match(rid, prompt, 0)
        blocks = [free.pop() for _ in range(-(-len(prompt) // TPB))]
        bm.allocated(rid, blocks)
        state[rid] = {"tokens": len(prompt), "blocks": len(blocks), "prompt": prompt, "ids": blocks}
    # prefill all of them in one step (not timed), then decode
    first = [Report(rid, s["prompt"], s["ids"], 0, len(s["prompt"])) for rid, s in state.items()]
    bm.apply_results(ok_results(bm.schedule(first, [])))
    for s in state.values():
        s["tokens"] += 1  # the first sampled token
    schedule_t, apply_t, stores = Timer(), Timer(), 0
    per_round = max(1, args.steps // args.rounds)
    for step in range(args.steps):
        if step and step % per_round == 0:
            schedule_t.end_round()
            apply_t.end_round()
        reports = []
        for rid, s in state.items():
            new_ids = []
            if s["tokens"] > s["blocks"] * TPB:
                new_ids = [free.pop()]
                s["blocks"] += 1
            reports.append(Report(rid, [rng.randrange(150_000)], new_ids, s["tokens"] - 1, 1))
        with schedule_t:
            ops = bm.schedule([], reports)
        stores += int(len(ops.src))
        results = ok_results(ops)
        with apply_t:
            bm.apply_results(results)
        for s in state.values():
            s["tokens"] += 1
    return {
        "requests": n,
        "steps": args.steps,
        "blocks_stored_per_step": stores / args.steps,
        "schedule": schedule_t.summary(),
        "apply_results": apply_t.summary(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--prompt-tokens", type=int, default=20_000)
    parser.add_argument("--host-blocks", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--decode-prompt", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if args.quick:
        args.prompt_tokens, args.host_blocks, args.repeat = 2000, 2000, 20
        args.requests, args.decode_prompt, args.steps, args.rounds = 16, 200, 20, 2
    results = {
        "command": "python benchmarks/leader_bench.py " + " ".join(sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                    "numpy": np.__version__},
        "match": bench_match(args),
        "schedule": bench_schedule(args),
    }
    m, s = results["match"], results["schedule"]
    at_target_size = m["prompt_tokens"] == 20_000 and s["requests"] == 256  # the targets' scenario
    rows = [
        (f"match {m['prompt_tokens']} tokens, full host hit, list", m["hit_list"], 300 if at_target_size else None),
        (f"match {m['prompt_tokens']} tokens, miss (list)", m["miss_list"], None),
        (f"match {m['prompt_tokens']} tokens, full host hit (ndarray)", m["hit_ndarray"], None),
        (f"schedule() {s['requests']} decode requests", s["schedule"], 1000 if at_target_size else None),
        (f"apply_results() after each step", s["apply_results"], None),
    ]
    print(f"host tier: {m['registered_blocks']} registered blocks; "
          f"{s['blocks_stored_per_step']:.1f} blocks stored per decode step")
    print(f"{'scenario (us)':52s} {'cpu med':>8s} {'best rnd':>8s} {'cpu p90':>8s} {'wall med':>9s} {'target':>7s}")
    for label, stats, target in rows:
        c, w = stats["cpu"], stats["wall"]
        tgt = f"{target}" if target else "-"
        print(f"{label:52s} {c['median_us']:8.0f} {stats['cpu_best_round_median_us']:8.0f} {c['p90_us']:8.0f} "
              f"{w['median_us']:9.0f} {tgt:>7s}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
