"""GPU diagnosis of the no-reuse run: is the reference model deterministic across runs, does kvbm
change any output, and where does the kvbm run spend its extra time (forward vs the rest)?

python3 benchmarks/gpu/diagnose.py [--users 16] [--history 2000]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from kvbm_core.testing import ExecutorConfig, ReferenceExecutor, RequestSpec
from kvbm_core.trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker


def summary(name: str, result) -> None:
    steps = result.steps
    fwd = sum(s.forward_s for s in steps)
    dur = sum(s.duration_s for s in steps)
    print(f"{name:12s} wall {result.wall_s:7.2f} s  forward {fwd:7.2f} s  loop-other {dur - fwd:6.2f} s  "
          f"iterations {result.counters.iterations}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--history", type=int, default=2000)
    p.add_argument("--answer", type=int, default=32)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    specs = [RequestSpec(rng.integers(1, 30000, args.history).tolist(), args.answer) for _ in range(args.users)]
    cfg = ExecutorConfig(model="llama-3-8b", device="cuda", tokens_per_block=32, num_blocks=2048,
                         max_batch_size=16, max_num_tokens=8192, max_seq_len=args.history + args.answer)
    base = ReferenceExecutor(cfg)
    base.run(specs[:2])  # warm-up
    a = base.run(specs)
    summary("baseline A", a)
    b = ReferenceExecutor(cfg, model=base.model).run(specs)
    summary("baseline B", b)
    print("baseline A == baseline B:", a.tokens() == b.tokens(), flush=True)
    os.environ["DYN_KVBM_CPU_CACHE_GB"] = "24"
    kv = ReferenceExecutor(cfg, connector=(KvbmConnectorLeader, KvbmConnectorWorker), model=base.model)
    c = kv.run(specs)
    summary("kvbm", c)
    print("baseline A == kvbm:", a.tokens() == c.tokens(), "; B == kvbm:", b.tokens() == c.tokens(), flush=True)
    differ = [i for i, (x, y) in enumerate(zip(a.tokens(), c.tokens())) if x != y]
    print("requests differing from A:", differ, flush=True)
    for w in kv.workers:
        w.close()
    kv.scheduler.close()


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    main()
