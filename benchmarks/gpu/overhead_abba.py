"""kvbm's overhead when nothing is reused, measured ABBA (baseline, kvbm, kvbm, baseline) in one
process, so that drift of the shared GPU over time does not count against whichever run is second.

python3 benchmarks/gpu/overhead_abba.py [--users 32] [--history 2000] [--answer 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from kvbm_core.testing import ExecutorConfig, ReferenceExecutor, RequestSpec
from kvbm_core.trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--history", type=int, default=2000)
    p.add_argument("--answer", type=int, default=16)
    p.add_argument("--cpu-cache-gb", default="16")
    args = p.parse_args()
    def workload(seed: int) -> list[RequestSpec]:  # fresh prompts for every run: nothing to reuse, anywhere
        rng = np.random.default_rng(seed)
        return [RequestSpec(rng.integers(1, 30000, args.history).tolist(), args.answer) for _ in range(args.users)]

    cfg = ExecutorConfig(model="llama-3-8b", device="cuda", tokens_per_block=32, num_blocks=2048,
                         max_batch_size=16, max_num_tokens=8192, max_seq_len=args.history + args.answer)
    warm = ReferenceExecutor(cfg)
    warm.run(workload(99)[:4])
    os.environ["DYN_KVBM_CPU_CACHE_GB"] = args.cpu_cache_gb
    kvbm = ReferenceExecutor(cfg, connector=(KvbmConnectorLeader, KvbmConnectorWorker), model=warm.model)
    base = ReferenceExecutor(cfg, model=warm.model)
    walls: dict[str, list[float]] = {"baseline": [], "kvbm": []}
    for seed, name in enumerate(("baseline", "kvbm", "kvbm", "baseline")):
        result = (kvbm if name == "kvbm" else base).run(workload(seed))
        walls[name].append(result.wall_s)
        print(f"{name:9s} wall {result.wall_s:6.2f} s", flush=True)
    ratio = sum(walls["baseline"]) / sum(walls["kvbm"])
    print(json.dumps({"walls": walls, "throughput_ratio_kvbm_over_baseline": ratio,
                      "users": args.users, "history": args.history, "answer": args.answer}))
    for worker in kvbm.workers:
        worker.close()
    kvbm.scheduler.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
