"""Where kvbm's no-reuse overhead comes from: the baseline and kvbm variants interleaved in one
process (A B C ... then reversed), with each run's forward time split into prefill and decode steps.

Variants (each one removes a single suspect; the harness changes nothing in the executor):

- ``baseline``: no connector.
- ``kvbm``: kvbm as shipped (stores start on the forward-pass callable, before the sample is read).
- ``kvbm-nostores``: every connector call as usual, but no device -> host copy is ever issued.
- ``kvbm-nohooks``: kvbm as shipped, but decode-only steps run without the per-layer hooks (the
  executor's ``cuda_graphs`` switch, which changes nothing else).
- ``kvbm-runs``: stores copied with one ``copy_`` per run instead of ``cuMemcpyBatchAsync``.
- ``kvbm-late``: stores issued from ``get_finished``, after the executor read the sampled tokens,
  so no store copy is queued ahead of the engine's own device -> host reads of the samples.

Per run it prints wall, forward time of steps with prefill tokens and of decode-only steps, and the
stores' total bytes and mean GB/s (CUDA event timing of each store operation).

python3 benchmarks/gpu/overhead_variants.py [--users 24] [--history 2000] [--answer 16]
        [--variants baseline,kvbm,kvbm-nostores,kvbm-late,kvbm-nohooks,kvbm-runs]
On CPU at a tiny size: --model tiny --device cpu --users 4 --history 256 --num-blocks 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from kvbm_core.testing import ExecutorConfig, ReferenceExecutor, RequestSpec
from kvbm_core.testing.shapes import resolve_shape
from kvbm_core.trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker

STORE_BYTES: list[float] = [0.0, 0.0]  # bytes, seconds of the D2H results of the current run


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
    def _start_stores(self, stream: Any) -> None:
        ops = self._current_ops()
        if ops is None or ops.step == self._stores_started_for:
            return
        self._stores_started_for = ops.step
        self._start_background()


class LateStoresWorker(_Recording):
    def _on_forward_pass_done(self) -> None:
        pass

    def wait_for_save(self, stream: Any) -> None:
        pass

    def get_finished(self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]):  # type: ignore[no-untyped-def]
        pool = self._pool
        if pool is not None:
            self._start_stores(torch.cuda.current_stream(pool.device) if pool.is_cuda else None)
        return super().get_finished(finished_gen_req_ids, started_loading_req_ids)


class RunsWorker(_Recording):
    def _setup(self, config: Any) -> None:
        super()._setup(config)
        if self._engine.copier.strategy == "batch":
            self._engine.copier.strategy = "runs"


WORKERS = {"kvbm": _Recording, "kvbm-nohooks": _Recording, "kvbm-nostores": NoStoresWorker, "kvbm-late": LateStoresWorker,
           "kvbm-runs": RunsWorker}


def _stream_facts(executor: ReferenceExecutor) -> str:
    """The copy strategy and the CUDA flags of the store stream (1: non-blocking) of rank 0."""
    engine = executor.workers[0]._engine
    if engine is None or not engine.cuda:
        return f"copies={engine.copier.strategy if engine is not None else None}"
    import ctypes

    from kvbm_core.storage.host_memory import _mapped_library

    stream = engine._store_lane.submit(engine._stream).result()
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
    p.add_argument("--variants", default="baseline,kvbm,kvbm-nostores,kvbm-late,kvbm-nohooks,kvbm-runs")
    args = p.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n != "baseline" and n not in WORKERS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: baseline, {', '.join(WORKERS)}")

    top = min(30000, resolve_shape(args.model).vocab_size)  # the token range of overhead_abba.py

    def workload(seed: int) -> list[RequestSpec]:  # fresh prompts every run: nothing to reuse
        rng = np.random.default_rng(seed)
        return [RequestSpec(rng.integers(1, top, args.history).tolist(), args.answer) for _ in range(args.users)]

    cfg = ExecutorConfig(model=args.model, device=args.device, tokens_per_block=32, num_blocks=args.num_blocks,
                         max_batch_size=16, max_num_tokens=8192, max_seq_len=args.history + args.answer)
    warm = ReferenceExecutor(cfg)
    warm.run(workload(99)[:4])
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
    for seed, name in enumerate(names + names[::-1]):
        STORE_BYTES[:] = [0.0, 0.0]
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
               "steps": len(result.steps), "stored_gb": gb, "store_gbps": gb / STORE_BYTES[1] if STORE_BYTES[1] else 0.0}
        rows[name].append(row)
        print(f"{name:14s} wall {result.wall_s:6.2f} s  prefill-fwd {prefill:6.2f} s  decode-fwd {decode:6.2f} s  "
              f"steps {len(result.steps)}  stored {gb:5.2f} GB at {row['store_gbps']:5.1f} GB/s", flush=True)
    base = sum(r["wall_s"] for r in rows.get("baseline", [])) or None
    summary = {n: {"wall_s": [round(r["wall_s"], 3) for r in rs],
                   "prefill_fwd_s": [round(r["prefill_fwd_s"], 3) for r in rs],
                   "decode_fwd_s": [round(r["decode_fwd_s"], 3) for r in rs],
                   "throughput_vs_baseline": round(base / sum(r["wall_s"] for r in rs), 4) if base else None}
               for n, rs in rows.items()}
    print(json.dumps(summary))
    for ex in executors.values():
        for w in ex.workers:
            w.close()
        if ex.scheduler is not None:
            ex.scheduler.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
