"""``kvbm bench`` for real: the console script in a subprocess, at a size that runs in seconds.

The outputs check is proven against a real plugin distribution with a broken host tier (its stores
are lost and its loads read zeros), installed the way ``tests/conftest.py``'s ``fake_distribution``
installs any plugin.
"""

from __future__ import annotations

import json
from pathlib import Path

# Three users rotate through a device pool that holds one of them: kvbm's host tier serves the reuse.
SMALL = ("--users", "3", "--rounds", "3", "--system-tokens", "32", "--history-tokens", "96",
         "--question-tokens", "8", "--answer-tokens", "8", "--num-device-blocks", "16", "--qps", "inf",
         "--no-progress")
KEYS = {"command", "date", "machine", "preset", "config", "engine", "workload", "kvbm_settings", "baseline", "kvbm",
        "ratios", "outputs", "requests"}


def test_a_small_bench_writes_json_and_png_and_reports_identical_outputs(run_kvbm, tmp_path):
    proc = run_kvbm("bench", *SMALL, "--out", str(tmp_path), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "outputs identical: yes (9 requests" in proc.stdout
    for row in ("TTFT mean (ms)", "TTFT p50 (ms)", "TTFT p90 (ms)", "TTFT p99 (ms)", "input tokens/s",
                "output tokens/s", "hit rates: host"):
        assert row in proc.stdout, row
    doc = json.loads((tmp_path / "embedded-cpu.json").read_text())
    assert KEYS <= doc.keys()
    assert doc["command"].startswith("kvbm bench --users 3 --rounds 3")
    assert doc["machine"]["device"] == "cpu" and doc["machine"]["device_name"]
    assert doc["config"]["users"] == 3 and doc["config"]["qps"] == "inf"
    assert doc["kvbm_settings"]["set_by_bench"]["DYN_KVBM_PROFILE"] == "preset embedded"
    assert doc["kvbm_settings"]["resolved"]["tiers"][0]["kind"] == "cpu"
    assert doc["workload"]["device_pool_overflows"] is True
    assert doc["outputs"] == {"identical": True, "compared": 9, "differences": []}
    for run in ("baseline", "kvbm"):
        assert doc[run]["requests"] == 9
        assert set(doc[run]["ttft_s"]) == {"mean_s", "p50_s", "p90_s", "p99_s"}
        assert doc[run]["output_tokens"] == 9 * 8
        assert len(doc["requests"][run]) == 9
    kvbm = doc["kvbm"]
    assert kvbm["hit_rates"]["host"] > 0 and kvbm["connector_tokens"] > 0 and kvbm["hit_rates"]["requests"] == 9
    blocks = kvbm["leader_stats"]["blocks"]
    warmup_d2h = blocks["d2h"] - kvbm["offload"]["d2h"]["blocks"]  # the leader counts the warm-up too
    assert 0 < warmup_d2h and blocks["h2d"] >= kvbm["onboard"]["cpu"]["blocks"]
    assert kvbm["offload"]["d2h"]["blocks"] > 0 and kvbm["offload"]["d2h"]["gb_per_s"] > 0
    assert kvbm["onboard"]["cpu"]["blocks"] == kvbm["hit_rates"]["host_hit_blocks"]
    assert doc["baseline"]["connector_tokens"] == 0
    digests = {run: {(r["user"], r["round"]): r["output_sha256"] for r in doc["requests"][run]}
               for run in ("baseline", "kvbm")}
    assert digests["baseline"] == digests["kvbm"]
    assert doc["ratios"]["ttft_speedup_mean"] > 0 and doc["ratios"]["output_throughput"] > 0
    png = (tmp_path / "embedded-cpu.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_the_no_reuse_preset_runs_and_finds_nothing_to_load(run_kvbm, tmp_path):
    proc = run_kvbm("bench", "--preset", "no-reuse", "--users", "4", "--history-tokens", "64",
                    "--no-progress", "--out", str(tmp_path), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "outputs identical: yes (4 requests" in proc.stdout
    doc = json.loads((tmp_path / "no-reuse-cpu.json").read_text())
    kvbm = doc["kvbm"]
    assert kvbm["connector_tokens"] == 0 and kvbm["hit_rates"]["host_hit_blocks"] == 0
    assert kvbm["onboard"] == {} and kvbm["offload"]["d2h"]["blocks"] == 4 * (64 + 16) // 16
    assert doc["ratios"]["output_throughput"] > 0


def test_a_disk_profile_runs_in_a_temporary_directory(run_kvbm, tmp_path):
    env = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "8", "DYN_KVBM_DISK_CACHE_GB": "0.01",
           "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}
    proc = run_kvbm("bench", *SMALL, "--profile", "cpu_disk", "--out", str(tmp_path), env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "embedded-cpu_disk.json").read_text())
    temporary = doc["kvbm_settings"]["variables"]["DYN_KVBM_DISK_CACHE_DIR"]
    assert doc["kvbm_settings"]["set_by_bench"] == {"DYN_KVBM_PROFILE": "--profile",
                                                    "DYN_KVBM_DISK_CACHE_DIR": "temporary directory of this run"}
    assert doc["outputs"]["identical"] is True
    assert doc["kvbm"]["offload"]["h2disk"]["blocks"] > 0
    assert doc["kvbm"]["leader_stats"]["failed_ops"] == 0
    assert not Path(temporary).exists()


LOSSY_TIER = """
    import torch
    from kvbm_core import hookimpl
    from kvbm_core.storage import HostStorage

    class LossyTier(HostStorage):
        name = "lossy_ram"
        pinned = False

        def __init__(self, context):
            super().__init__(context)
            self._shape = (context.num_slots, context.layout.bytes_per_block)
            self.segment_slots = context.num_slots

        @property
        def slots(self):
            return torch.zeros(self._shape, dtype=torch.uint8)  # a new buffer every time: stores are lost

        def close(self):
            pass

    @hookimpl
    def kvbm_tier_types():
        return [LossyTier]
"""


def test_outputs_that_differ_exit_1_with_the_requests_named(run_kvbm, fake_distribution, tmp_path):
    site = fake_distribution("kvbm-lossy-tier", "kvbm_lossy_tier", LOSSY_TIER)
    profile = tmp_path / "lossy.yaml"
    profile.write_text("tiers:\n  - kind: lossy_ram\n    capacity_gb: 0.01\n")
    out = tmp_path / "out"
    proc = run_kvbm("bench", *SMALL, "--profile", str(profile), "--out", str(out), pythonpath=site, timeout=180)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "outputs identical: NO" in proc.stdout
    assert "kvbm bench: outputs differ between the baseline and the kvbm run" in proc.stderr
    doc = json.loads((out / "embedded-lossy.json").read_text())
    assert doc["outputs"]["identical"] is False
    differences = doc["outputs"]["differences"]
    assert differences and all(d["round"] > 0 for d in differences)  # round 0 loads nothing
    assert doc["kvbm"]["connector_tokens"] > 0
    assert (out / "embedded-lossy.png").is_file()


def test_a_bad_knob_exits_2_naming_the_flag(run_kvbm, tmp_path):
    proc = run_kvbm("bench", "--num-device-blocks", "4", "--out", str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().startswith("kvbm: error: --num-device-blocks: 4 blocks cannot hold")
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())
