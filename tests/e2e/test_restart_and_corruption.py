"""The disk tier across process restarts: a new process serves what the previous one wrote, and a
corrupted block is never served (it is never promised: the request computes it), and blocks computed
by other weights saved under the same path are never served either."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from kvbm_tier_disk.format import HEADER_BYTES, record_bytes

SCRIPT = Path(__file__).with_name("restart_run.py")
BYTES_PER_BLOCK = 12288  # tiny model: 2 layers x 2 (K, V) x 2 heads x 16 tokens x 16 dims x 4 bytes


def engine_process(directory: Path, turn: int, seed: int = 0) -> dict:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(directory), str(turn), str(seed)], capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_restarted_process_serves_blocks_written_before(tmp_path):
    first = engine_process(tmp_path, 0)
    assert first["same_tokens"] and first["to_disk"] > 0
    second = engine_process(tmp_path, 1)
    assert second["same_tokens"] and not second["errors"]
    assert second["staged"] > 0  # turn 1 extends turn 0: its prefix came from the previous process's disk


def test_blocks_of_other_weights_at_the_same_path_are_never_served(tmp_path):
    """A fine-tune saved over the checkpoint the previous process served: same model id, new KV."""
    first = engine_process(tmp_path, 0, seed=0)
    assert first["same_tokens"] and first["to_disk"] > 0
    second = engine_process(tmp_path, 1, seed=1)
    assert second["same_tokens"] and not second["errors"], second  # equal to the new weights' recomputation
    assert second["staged"] == 0, second


def test_corrupted_disk_block_is_never_served(tmp_path):
    first = engine_process(tmp_path, 0)
    assert first["same_tokens"] and first["to_disk"] > 0
    (blocks_file,) = tmp_path.glob("kvbm-*-rank0.blocks")
    record = record_bytes(BYTES_PER_BLOCK)
    size = blocks_file.stat().st_size
    data = np.memmap(blocks_file, dtype=np.uint8, mode="r+")
    for slot in range(size // record):  # one flipped bit in the data of every record
        data[slot * record + HEADER_BYTES + 1000] ^= 0x10
    data.flush()
    del data
    second = engine_process(tmp_path, 1)
    assert second["same_tokens"] and not second["errors"], second  # nothing bad was promised...
    assert second["staged"] == 0, second  # ...nor staged: every request computed its prefix
