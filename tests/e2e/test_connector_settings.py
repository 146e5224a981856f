"""What the connector refuses, ignores or reports, and the names users put in their YAML."""

from __future__ import annotations

import importlib
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from engine_runs import CONNECTOR, close_connector, conversations, executor_config, write_profile

from kvbm_core.errors import ConfigError
from kvbm_core.ops import StepOps
from kvbm_core.testing import ReferenceExecutor
from kvbm_core.testing.llm_args import KvCacheConfig, ParallelConfig, TorchLlmArgs
from kvbm_core.trtllm.connector import KvbmConnectorLeader

REPO = Path(__file__).resolve().parents[2]


def llm_args(**kv_cache: object) -> TorchLlmArgs:
    return TorchLlmArgs(
        model="tiny", tensor_parallel_size=1, parallel_config=ParallelConfig(tp_size=1),
        kv_cache_config=KvCacheConfig(**kv_cache), kv_connector_config=None, max_seq_len=512,
        max_batch_size=4, max_num_tokens=512, enable_chunked_prefill=False, disable_overlap_scheduler=True,
        cuda_graph_config=None, dtype="float32", kv_cache_dtype="float32",
    )


@pytest.fixture
def cpu_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("DYN_KVBM_PROFILE", str(write_profile(tmp_path / "p.yaml", [{"kind": "cpu", "num_blocks": 64}])))


def test_block_reuse_off_is_a_clear_error(cpu_profile):
    with pytest.raises(ConfigError, match="kv_cache_config.enable_block_reuse"):
        KvbmConnectorLeader(llm_args(enable_block_reuse=False))


def test_pipeline_parallelism_is_a_clear_error(cpu_profile):
    args = replace(llm_args(), parallel_config=ParallelConfig(tp_size=1, pp_size=2))
    with pytest.raises(ConfigError, match="pipeline"):
        KvbmConnectorLeader(args)


def test_trtllm_host_offload_with_the_connector_is_refused(cpu_profile):
    with pytest.raises(ConfigError, match="host_cache_size"):
        KvbmConnectorLeader(llm_args(host_cache_size=1 << 30))


def test_no_tier_configured_names_the_variables():
    with pytest.raises(ConfigError, match="DYN_KVBM_CPU_CACHE_GB"):
        KvbmConnectorLeader(llm_args())


def test_partial_reuse_is_accepted(cpu_profile):
    """Partial reuse only costs hits (a device match inside a block gets no kvbm match): a warning."""
    KvbmConnectorLeader(llm_args(enable_partial_reuse=True)).close()


def test_multimodal_requests_are_left_to_the_engine(cpu_profile):
    class Request:
        request_id = 7
        multimodal_positions = [3]
        is_generation_only_request = False

        def get_tokens(self, beam: int) -> list[int]:
            return list(range(64))

    leader = KvbmConnectorLeader(llm_args())
    try:
        assert leader.get_num_new_matched_tokens(Request(), 0) == (0, False)
        assert leader.request_finished(Request(), [0, 1]) is False
    finally:
        leader.close()


def test_step_metadata_is_small_and_picklable(kvbm_run):
    result = kvbm_run(conversations(users=2, turns=2), [{"kind": "cpu", "num_blocks": 64}])
    meta = result.executor.workers[0].get_connector_meta()
    assert isinstance(meta, StepOps)
    assert pickle.loads(pickle.dumps(meta)) == meta


@pytest.mark.parametrize("name", ["kvbm_llm_api_config.yaml", "kvbm_llm_api_config_dynamo_names.yaml"])
def test_shipped_llm_api_yaml_names_importable_classes(name):
    config = yaml.safe_load((REPO / "configs" / "trtllm" / name).read_text())["kv_connector_config"]
    module = importlib.import_module(config["connector_module"])
    assert getattr(module, config["connector_scheduler_class"]) is CONNECTOR[0]
    assert getattr(module, config["connector_worker_class"]) is CONNECTOR[1]


def test_dynamo_names_work_by_changing_only_the_module(tmp_path, monkeypatch):
    module = importlib.import_module("kvbm_core.trtllm.connector")
    pair = (module.DynamoKVBMConnectorLeader, module.DynamoKVBMConnectorWorker)
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "128")  # the seed guide's variables
    specs = conversations(users=2, turns=2)
    baseline = ReferenceExecutor(executor_config()).run(specs)
    executor = ReferenceExecutor(executor_config(), connector=pair)
    try:
        assert executor.run(specs).tokens() == baseline.tokens()
        assert executor.scheduler.stats.offload_blocks_d2h > 0
    finally:
        close_connector(executor)


def test_an_aborted_request_lets_go_of_its_promised_host_blocks(kvbm_run):
    """Connector-manager variants with aborts: the promise made in the lookup is released at once."""
    from kvbm_core.leader.slot_state import SlotState

    specs = conversations(users=2, turns=2)
    result = kvbm_run(specs, [{"kind": "cpu", "num_blocks": 64}])
    leader = result.executor.scheduler

    class Request:
        request_id = 10_000
        is_generation_only_request = False

        def get_tokens(self, beam: int) -> list[int]:
            return list(specs[0].prompt)

    manager = leader._block_manager()
    matched, load_async = leader.get_num_new_matched_tokens(Request(), 0)
    assert matched > 0 and load_async is False
    assert manager.host.count(SlotState.HELD) > 0
    assert leader.abort_request(Request.request_id, "cancelled") is True
    assert manager.host.count(SlotState.HELD) == 0 and manager.num_requests == 0
    manager.verify()
    assert leader.finish_load(Request.request_id) is True
    worker = result.executor.workers[0]
    assert worker.take_failed_load_request_ids() == set() and worker.abort_request(Request.request_id) is True


def test_blocks_are_held_only_where_the_engine_writes_them_outside_the_forward_pass():
    """Partial-reuse copies and a disaggregated server's incoming KV write freed blocks before
    start_load_kv could order them after kvbm's stores: only then are finished requests held."""
    from types import SimpleNamespace

    from kvbm_core.trtllm.engine_args import pins_finished_requests as _pins_finished_requests

    assert not _pins_finished_requests(llm_args())
    assert _pins_finished_requests(llm_args(enable_partial_reuse=True))
    assert not _pins_finished_requests(llm_args(enable_partial_reuse=True, copy_on_partial_reuse=False))
    disaggregated = replace(llm_args(), cache_transceiver_config=SimpleNamespace(backend="UCX"))
    assert _pins_finished_requests(disaggregated)


def test_the_leader_learns_prefill_speed_from_rank_0s_forward_passes(kvbm_run):
    """Every forward pass is timed on rank 0 and reaches the cost model (steps that computed prompt
    tokens and loaded nothing teach it the engine's prefill speed)."""
    result = kvbm_run(conversations(users=4, turns=2, history=200), [{"kind": "cpu", "num_blocks": 256}],
                      config=executor_config(max_seq_len=1024, max_num_tokens=1024))
    result.assert_same_tokens()
    cost = result.executor.scheduler._block_manager()._cost
    assert cost.prefill.observed > 0
    assert cost.prefill.tokens_per_s != 30_000  # the configured start was replaced by what was measured
