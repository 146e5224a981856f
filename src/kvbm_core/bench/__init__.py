"""``kvbm bench``: LMBenchmark-style multi-round QA on the reference executor, without and with kvbm.

The data path: :mod:`.workload` (token ids and arrival schedule) -> :mod:`.sessions` (feeds a run:
later rounds are created as earlier ones finish) -> :mod:`.runner` (baseline run, then the kvbm run
in an environment set by :mod:`.environment`, counters from :mod:`.collector`) -> :mod:`.summary`
(TTFT, throughput, ratios, outputs check) -> :mod:`.report` (JSON, PNG, printed summary). Knobs and
presets: :mod:`.presets`. This package imports only the light modules; the runner and the report
(torch, the reference model, tqdm, matplotlib) are imported from their modules::

    from kvbm_core.bench import build_config
    from kvbm_core.bench.report import Report
    from kvbm_core.bench.runner import run_bench

    result = run_bench(build_config("embedded", {"users": 4, "rounds": 3}))
    assert Report(result, "kvbm bench --users 4 --rounds 3", started).outputs.identical
"""

from kvbm_core.bench.presets import DEFAULT_PRESET, PRESETS, BenchConfig, Preset, build_config
from kvbm_core.bench.workload import MultiRoundQA, WorkloadConfig

__all__ = ["DEFAULT_PRESET", "PRESETS", "BenchConfig", "MultiRoundQA", "Preset", "WorkloadConfig", "build_config"]
