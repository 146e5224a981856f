"""Where kvbm's no-reuse overhead comes from: the baseline and kvbm variants interleaved in one
process (A B C ... then reversed), with each run's forward time split into prefill and decode steps.

Variants (each one removes a single suspect; the harness changes nothing in the executor):

- ``baseline``: no connector.
- ``kvbm``: kvbm as shipped (stores issued in ``get_finished``, after the engine queued its read of
  the sampled tokens).
- ``kvbm-nostores``: every connector call as usual, but no device -> host copy is ever issued.
- ``kvbm-nohooks``: kvbm as shipped, but decode-only steps run without the per-layer hooks (the
  executor's ``cuda_graphs`` switch, which changes nothing else).
- ``kvbm-runs``: stores copied with one ``copy_`` per run instead of ``cuMemcpyBatchAsync``.
- ``kvbm-early``: stores issued at the end of the forward pass (the forward-pass callable), so
  they are queued on the device -> host copy engine ahead of the engine's read of the samples.

Per run it prints wall, forward time of steps with prefill tokens and of decode-only steps, the
launching thread's CPU time inside the forward pass and in the garbage collector, and the stores'
total bytes and mean GB/s (CUDA event timing of each store operation). With ``--rounds N`` the
pass (variants forward, then reversed) repeats N times; the summary gives, per variant, the
throughput ratio to the baseline of each round, their median, and over all runs.

python3 benchmarks/gpu/overhead_variants.py [--users 24] [--history 2000] [--answer 16]
        [--variants baseline,kvbm,kvbm-early,kvbm-nostores,kvbm-nohooks,kvbm-runs] [--rounds 1] [--out F]
On CPU at a tiny size: --model tiny --device cpu --users 4 --history 256 --num-blocks 256
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np

from kvbm_core.testing import ExecutorConfig, ReferenceExecutor, RequestSpec
from kvbm_core.testing.shapes import resolve_shape
from kvbm_core.trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker

STORE_BYTES: list[float] = [0.0, 0.0]  # bytes, seconds of the D2H results of the current run
MAIN_CPU: list[float] = [0.0, 0.0]  # main-thread CPU seconds inside model.forward, seconds in gc
_gc_began: list[float] = [0.0]


def _time_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_began[0] = time.perf_counter()
    else:
        MAIN_CPU[1] += time.perf_counter() - _gc_began[0]


def _count_cpu(forward: Any) -> Any:
    """``model.forward`` that adds the calling thread's CPU time to MAIN_CPU[0]: wall time above it
    is time the launching thread spent waiting (for the GIL, or for a full launch queue)."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.thread_time()
        try:
            return forward(*args, **kwargs)
        finally:
            MAIN_CPU[0] += time.thread_time() - began

    return timed


class _Recording(KvbmConnectorWorker):
    """Adds each polled store result to STORE_BYTES (reads what the engine reports, nothing more)."""

    def _collect_results(self) -> None:
        engine = self._engine
        results = engine.poll()
        for ticket_result in results:
            STORE_BYTES[0] += ticket_result.num_bytes
            STORE_BYTES[1] += ticket_result.seconds
        engine_poll, engine.poll = engine.poll, lambda: results
        try:
            super()._collect_results()
        finally:
            engine.poll = engine_poll


class NoStoresWorker(_Recording):
    def _start_stores(self) -> None:
        ops = self._current_ops()
        if ops is None or ops.step == self._stores_started_for:
            return
        self._stores_started_for = ops.step
        self._start_background()


class EarlyStoresWorker(_Recording):
    def _mark_forward_end(self, stream: Any) -> None:
        super()._mark_forward_end(stream)
        self._start_stores()


class RunsWorker(_Recording):
    def _setup(self, config: Any) -> None:
        super()._setup(config)
        if self._engine.copier.strategy == "batch":
            self._engine.copier.strategy = "runs"


WORKERS = {"kvbm": _Recording, "kvbm-nohooks": _Recording, "kvbm-nostores": NoStoresWorker, "kvbm-early": EarlyStoresWorker,
           "kvbm-runs": RunsWorker}


def _stream_facts(executor: ReferenceExecutor) -> str:
    """The copy strategy and the CUDA flags of the store stream (1: non-blocking) of rank 0."""
    engine = executor.workers[0]._engine
    if engine is None or not engine.cuda:
        return f"copies={engine.copier.strategy if engine is not None else None}"
    import ctypes

    from kvbm_core.storage.host_memory import _mapped_library

    stream = engine._store_lane.stream
    flags = ctypes.c_uint(99)
    path = _mapped_library("libcudart.so")
    if path is not None:
        ctypes.CDLL(path).cudaStreamGetFlags(ctypes.c_void_p(stream.cuda_stream), ctypes.byref(flags))
    return f"copies={engine.copier.strategy} store_stream_flags={flags.value} (1 = non-blocking)"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--users", type=int, default=24)
    p.add_argument("--history", type=int, default=2000)
    p.add_argument("--answer", type=int, default=16)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--num-blocks", type=int, default=2048)
    p.add_argument("--cpu-cache-gb", default="8")  # per kvbm variant; 24 x 2000 tokens need 6.2 GB
    p.add_argument("--variants", default="baseline,kvbm,kvbm-early,kvbm-nostores,kvbm-nohooks,kvbm-runs")
    p.add_argument("--rounds", type=int, default=1, help="passes of the variants, each forward then reversed")
    p.add_argument("--out", help="write the summary JSON here")
    args = p.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n != "baseline" and n not in WORKERS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: baseline, {', '.join(WORKERS)}")

    top = min(30000, resolve_shape(args.model).vocab_size)  # token ids as in the earlier ABBA runs

    def workload(seed: int) -> list[RequestSpec]:  # fresh prompts every run: nothing to reuse
        rng = np.random.default_rng(seed)
        return [RequestSpec(rng.integers(1, top, args.history).tolist(), args.answer) for _ in range(args.users)]

    cfg = ExecutorConfig(model=args.model, device=args.device, tokens_per_block=32, num_blocks=args.num_blocks,
                         max_batch_size=16, max_num_tokens=8192, max_seq_len=args.history + args.answer)
    warm = ReferenceExecutor(cfg)
    warm.run(workload(99)[:4])
    warm.model.forward = _count_cpu(warm.model.forward)  # type: ignore[method-assign]
    gc.callbacks.append(_time_gc)
    os.environ["DYN_KVBM_CPU_CACHE_GB"] = args.cpu_cache_gb
    executors = {}
    for name in names:
        connector = None if name == "baseline" else (KvbmConnectorLeader, WORKERS[name])
        config = replace(cfg, cuda_graphs=name == "kvbm-nohooks")
        executors[name] = ReferenceExecutor(config, connector=connector, model=warm.model)
    for name, ex in executors.items():
        if ex.connector is not None:
            print(f"{name}: {_stream_facts(ex)}", flush=True)
    rows: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for seed, name in enumerate((names + names[::-1]) * args.rounds):
        STORE_BYTES[:] = [0.0, 0.0]
        MAIN_CPU[:] = [0.0, 0.0]
        ex = executors[name]
        result = ex.run(workload(seed))
        for w in ex.workers:
            if w._engine is not None:
                w._collect_results()
                w._channel.report(w._engine.drain(30.0))
        prefill = sum(s.forward_s for s in result.steps if s.context_tokens)
        decode = sum(s.forward_s for s in result.steps if not s.context_tokens)
        gb = STORE_BYTES[0] / 1e9
        row = {"wall_s": result.wall_s, "prefill_fwd_s": prefill, "decode_fwd_s": decode,
               "steps": len(result.steps), "main_cpu_fwd_s": MAIN_CPU[0], "gc_s": MAIN_CPU[1], "stored_gb": gb, "store_gbps": gb / STORE_BYTES[1] if STORE_BYTES[1] else 0.0}
        rows[name].append(row)
        print(f"{name:14s} wall {result.wall_s:6.2f} s  prefill-fwd {prefill:6.2f} s  decode-fwd {decode:6.2f} s  "
              f"cpu-in-fwd {MAIN_CPU[0]:6.2f} s  gc {MAIN_CPU[1]:5.2f} s  steps {len(result.steps)}  stored {gb:5.2f} GB at {row['store_gbps']:5.1f} GB/s", flush=True)
    summary: dict[str, Any] = {"command": " ".join(sys.argv), "args": vars(args), "variants": {}}
    base = rows.get("baseline")
    for n, rs in rows.items():
        entry: dict[str, Any] = {k: [round(r[k], 3) for r in rs] for k in rs[0]}
        if base:  # per round (2 runs of each variant, ABBA-ordered): baseline wall / variant wall
            def wall(runs: list[dict[str, float]]) -> float:
                return sum(r["wall_s"] for r in runs)

            per_round = [wall(base[2 * i : 2 * i + 2]) / wall(rs[2 * i : 2 * i + 2]) for i in range(args.rounds)]
            entry["throughput_vs_baseline_per_round"] = [round(x, 4) for x in per_round]
            entry["throughput_vs_baseline_median"] = round(float(np.median(per_round)), 4)
            entry["throughput_vs_baseline"] = round(wall(base) / wall(rs), 4)
        summary["variants"][n] = entry
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    for ex in executors.values():
        for w in ex.workers:
            w.close()
        if ex.scheduler is not None:
            ex.scheduler.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
