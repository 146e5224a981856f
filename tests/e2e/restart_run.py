"""One engine process for the restart tests: serve turn T of the standard conversations with kvbm
(disk-only profile in DIR) and without, and print a JSON line with what happened.

Run as ``python restart_run.py DIR TURN``. The process exits, as a restarted server would, so the
next run finds only what the disk tier left in DIR.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import CONNECTOR, close_connector, conversations, executor_config  # noqa: E402

from kvbm_core.errors import KvbmLoadError  # noqa: E402
from kvbm_core.testing import ReferenceExecutor  # noqa: E402


def main(directory: str, turn: int) -> None:
    torch.set_num_threads(1)
    profile = Path(directory) / "profile.yaml"
    profile.write_text(yaml.safe_dump({"tiers": [{"kind": "disk", "num_blocks": 256}], "cost_model": {"enabled": False}}))
    os.environ["DYN_KVBM_PROFILE"] = str(profile)
    os.environ["DYN_KVBM_DISK_CACHE_DIR"] = directory
    specs = [s for i, s in enumerate(conversations()) if i // 4 == turn]
    config = executor_config()
    baseline = ReferenceExecutor(config)
    expected = baseline.run(specs).tokens()
    executor = ReferenceExecutor(config, connector=CONNECTOR, model=baseline.model)
    out: dict = {"turn": turn}
    try:
        result = executor.run(specs)
        out["same_tokens"] = result.tokens() == expected
        out["errors"] = {}
    except KvbmLoadError as exc:
        out["load_error"] = {"requests": list(exc.request_ids), "message": str(exc)}
    stats = executor.scheduler.stats
    out["disk2d"] = stats.onboard_blocks_disk2d
    out["d2disk"] = stats.offload_blocks_d2disk
    out["connector_tokens"] = sum(r.connector_tokens for r in getattr(locals().get("result"), "requests", ()))
    close_connector(executor)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
