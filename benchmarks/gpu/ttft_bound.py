"""How close kvbm gets to the physical bound, on the reference executor with kvbm, in one process.

- **TTFT bound**: a request whose whole prefix (``--prefix`` tokens) is in the host tier and not on
  the device. Its TTFT is compared with ``prefix KV bytes / raw host -> device GB/s`` (one pinned
  copy of the same bytes) plus the prefill time of its uncached suffix (the same request again
  with the prefix on the device, another suffix of the same length), both measured in this run.
  Target: ratio <= 1.2. Run with layer-by-layer loads and with whole-block loads, interleaved.
- **Offload latency**: from the end of a prefill's forward pass to the leader counting its blocks
  stored, against one raw device -> host copy of the same bytes. Target: <= raw + 2 ms.

    python3 benchmarks/gpu/ttft_bound.py --out OUTDIR/ttft_bound.json [--model llama-3-8b] [--prefix 8192]

Needs a GPU for meaningful numbers (``--device cpu --model tiny --prefix 256`` runs the same code).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kvbm_core.testing import ExecutorConfig, ReferenceExecutor, RequestSpec
from kvbm_core.trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker

TPB = 32


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def raw_copy_s(nbytes: int, device: str, to_device: bool, repeats: int = 5) -> float:
    """Best time of one copy of ``nbytes`` between pinned host memory and the device."""
    pinned = device.startswith("cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        (dev.copy_(host, non_blocking=True) if to_device else host.copy_(dev, non_blocking=True))
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


VOCAB = [30000]  # set from the model in main()


def tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(10, VOCAB[0], n).tolist()


def stored_blocks(executor: ReferenceExecutor) -> int:
    return executor.scheduler.stats.offload_blocks_d2h


def offload_latency(executor: ReferenceExecutor, prompt: list[int], timeout_s: float = 30.0) -> dict:
    """Serve a one-token request; time from its last forward pass's end until every block is stored."""
    before = stored_blocks(executor)
    t_run = time.perf_counter()
    result = executor.run([RequestSpec(prompt, 1)])
    last = result.steps[-1]
    forward_end = t_run + last.start_s + last.forward_s
    want = before + len(prompt) // TPB
    deadline = time.perf_counter() + timeout_s
    while stored_blocks(executor) < want and time.perf_counter() < deadline:
        time.sleep(0.0002)
    done = time.perf_counter()
    return {"blocks": want - before, "stored": stored_blocks(executor) - before, "latency_s": done - forward_end}


def ttft(executor: ReferenceExecutor, prompt: list[int]) -> tuple[float, int, int]:
    """TTFT, prompt tokens loaded by the connector, prompt tokens reused on the device."""
    (request,) = executor.run([RequestSpec(prompt, 1)]).requests
    return request.ttft_s, request.connector_tokens, request.device_reused_tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prefix", type=int, default=8192, help="prefix tokens (a multiple of 32)")
    p.add_argument("--suffix", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--host-gb", default="16")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    os.environ.setdefault("DYN_KVBM_CPU_CACHE_GB", args.host_gb)
    prefix_blocks = args.prefix // TPB
    suffix_blocks = -(-args.suffix // TPB)
    num_blocks = prefix_blocks + suffix_blocks + 4
    config = ExecutorConfig(model=args.model, device=args.device, tokens_per_block=TPB, num_blocks=num_blocks,
                            max_batch_size=2, max_num_tokens=num_blocks * TPB, max_seq_len=num_blocks * TPB + 8,
                            model_mode="fast")
    executor = ReferenceExecutor(config, connector=(KvbmConnectorLeader, KvbmConnectorWorker))
    engine = executor.workers[0]._engine
    VOCAB[0] = executor.model.shape.vocab_size
    bpb = engine.bpb
    rng = np.random.default_rng(0)
    executor.run([RequestSpec(tokens(rng, min(512, args.prefix)), 2)])  # warm-up: kernels, cuBLAS handles
    flush_len = num_blocks * TPB - 1  # needs every block of the pool: evicts all the others

    offloads = [offload_latency(executor, tokens(rng, args.prefix)) for _ in range(args.repeats)]
    prefix_bytes = prefix_blocks * bpb
    raw_d2h = raw_copy_s(prefix_bytes, args.device, to_device=False)
    raw_h2d = raw_copy_s(prefix_bytes, args.device, to_device=True)

    rows = []
    pipelined_ok = engine.pipelined
    for rep in range(args.repeats):
        for pipelined in ([True, False] if pipelined_ok else [False]):
            prefix = tokens(rng, args.prefix)
            executor.run([RequestSpec(prefix + tokens(rng, 8), 1)])  # computed once, stored to the host tier
            executor.run([RequestSpec(tokens(rng, flush_len), 1)])  # evicts it from the device
            engine.pipelined = pipelined
            host_ttft, loaded, on_device = ttft(executor, prefix + tokens(rng, args.suffix))
            device_ttft, _, reused = ttft(executor, prefix + tokens(rng, args.suffix))  # prefix on the device now
            bound = raw_h2d + device_ttft
            rows.append({"repeat": rep, "pipelined": pipelined, "loaded_tokens": loaded, "device_tokens": on_device,
                         "reused_tokens_second": reused, "ttft_host_s": host_ttft,
                         "ttft_device_prefix_s": device_ttft, "raw_h2d_s": raw_h2d, "bound_s": bound,
                         "ratio": host_ttft / bound})
            print(json.dumps(rows[-1]), flush=True)
    engine.pipelined = pipelined_ok

    def median(key: str, pipelined: bool) -> float | None:
        values = [r[key] for r in rows if r["pipelined"] == pipelined]
        return statistics.median(values) if values else None

    latency = statistics.median(o["latency_s"] for o in offloads)
    report = {
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "model": args.model, "prefix_tokens": args.prefix, "suffix_tokens": args.suffix,
        "prefix_bytes": prefix_bytes, "date": time.strftime("%Y-%m-%d"),
        "copy_strategy": engine.copier.strategy, "pipelined_available": pipelined_ok,
        "ttft": rows,
        "ttft_ratio_median": {"pipelined": median("ratio", True), "whole_blocks": median("ratio", False)},
        "offload": offloads, "raw_d2h_s": raw_d2h, "offload_latency_median_s": latency,
        "offload_minus_raw_ms": (latency - raw_d2h) * 1e3,
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("ttft", "offload")}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    for worker in executor.workers:
        worker.close()
    executor.scheduler.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
