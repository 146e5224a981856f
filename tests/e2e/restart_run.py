"""One engine process for the restart tests: serve turn T of the standard conversations with kvbm
(disk-only profile in DIR) and without, and print a JSON line with what happened.

Run as ``python restart_run.py DIR TURN [SEED]``. The process exits, as a restarted server would, so
the next run finds only what the disk tier left in DIR. The model's weights (seeded by SEED, default
0) are written to DIR/weights and served from that path, as a checkpoint directory would be.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: engine_runs
from engine_runs import CONNECTOR, close_connector, conversations, executor_config  # noqa: E402

from kvbm_core.testing import ReferenceExecutor, RequestSpec  # noqa: E402


def main(directory: str, turn: int, seed: int = 0) -> None:
    torch.set_num_threads(1)
    profile = Path(directory) / "profile.yaml"
    profile.write_text(yaml.safe_dump({"tiers": [{"kind": "disk", "num_blocks": 256}], "cost_model": {"enabled": False}}))
    os.environ["DYN_KVBM_PROFILE"] = str(profile)
    os.environ["DYN_KVBM_DISK_CACHE_DIR"] = directory
    specs = [s for i, s in enumerate(conversations(users=4, turns=3)) if i % 3 == turn]  # user-major order
    # A newcomer that shares nothing with the stored conversations, served alongside them.
    newcomer = np.random.default_rng(1000 + turn).integers(1, 250, 120).tolist()
    specs.append(RequestSpec(newcomer, 6, arrival_step=1))
    config = executor_config(weights_dir=str(Path(directory) / "weights"), seed=seed)
    baseline = ReferenceExecutor(config)
    expected = baseline.run(specs).tokens()
    executor = ReferenceExecutor(config, connector=CONNECTOR, model=baseline.model)
    out: dict = {"turn": turn}
    result = executor.run(specs)
    out["errors"] = {i: r.error for i, r in enumerate(result.requests) if r.error}
    out["same_tokens"] = all(
        got == want for got, want, r in zip(result.tokens(), expected, result.requests) if not r.error
    )
    stats = executor.scheduler.stats
    out["staged"] = stats.staged_blocks_disk2h
    out["to_disk"] = stats.offload_blocks_h2disk
    if out["errors"]:  # the same requests again: the blocks that failed were dropped, so they recompute
        again = executor.run(specs)
        out["again_errors"] = {i: r.error for i, r in enumerate(again.requests) if r.error}
        out["again_same_tokens"] = all(
            got == want for got, want, r in zip(again.tokens(), expected, again.requests) if not r.error
        )
    close_connector(executor)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
