"""The reference executor and model: TensorRT-LLM's connector call order, without TensorRT-LLM.

For connector authors (kvbm's own connector is proven this way). Run a connector against the
baseline and compare::

    from kvbm_core.testing import ExecutorConfig, ReferenceExecutor, RequestSpec

    cfg = ExecutorConfig(model="tiny", tokens_per_block=16, num_blocks=64, oracle=True)
    specs = [RequestSpec(prompt=list(range(100)), max_new_tokens=8)]
    baseline = ReferenceExecutor(cfg).run(specs)
    executor = ReferenceExecutor(cfg, connector=(MyScheduler, MyWorker))
    assert executor.run(specs).tokens() == baseline.tokens()

- Ranks: ``ExecutorConfig(tp_size=2)`` builds one worker per rank. Each learns its rank as in
  TRT-LLM, from ``llm_args.parallel_config.to_mapping().rank``; the scheduler and rank 0's worker
  share one ``llm_args`` object, every other rank gets its own copy (as a separate MPI process
  would). Rank ``r``'s pool holds KV heads ``r*h .. (r+1)*h`` of every block.
- Oracle: ``oracle=True`` recomputes every device-reused or onboarded prefix without reuse and
  compares it with the pool, layer by layer, right after ``wait_for_layer_load``; a difference
  raises :class:`OracleMismatch`. Contract breaches raise :class:`ContractViolation`.
- GPU: ``ExecutorConfig(device="cuda", model="llama-3-8b")`` (presets ``tiny``, ``qwen3-0.6b``,
  ``llama-3-8b``); workers get ``torch.cuda.current_stream()``, on CPU ``torch.cpu.current_stream()``.
- On CPU the tiny model is fastest with ``torch.set_num_threads(1)``.
"""

from kvbm_core.testing.connector_manager import CallCounts
from kvbm_core.testing.errors import ContractViolation, ExecutorStopped, OracleMismatch
from kvbm_core.testing.executor import ExecutorConfig, ReferenceExecutor
from kvbm_core.testing.kv_manager import KvCacheManager
from kvbm_core.testing.llm_args import Mapping, TorchLlmArgs
from kvbm_core.testing.model import MODEL_MODES, Piece, ReferenceModel, greedy_decode
from kvbm_core.testing.pool import KvPools, PoolGeometry
from kvbm_core.testing.request import (
    KvCacheRetentionConfig,
    LlmRequest,
    LlmRequestState,
    LlmRequestV13,
    RequestSpec,
    TokenRangeRetentionConfig,
)
from kvbm_core.testing.results import RequestResult, RunCounters, RunResult, StepRecord
from kvbm_core.testing.shapes import PRESETS, ModelShape

__all__ = [
    "MODEL_MODES",
    "PRESETS",
    "CallCounts",
    "ContractViolation",
    "ExecutorConfig",
    "ExecutorStopped",
    "KvCacheManager",
    "KvCacheRetentionConfig",
    "KvPools",
    "LlmRequest",
    "LlmRequestState",
    "LlmRequestV13",
    "Mapping",
    "ModelShape",
    "OracleMismatch",
    "Piece",
    "PoolGeometry",
    "ReferenceExecutor",
    "ReferenceModel",
    "RequestResult",
    "RequestSpec",
    "RunCounters",
    "RunResult",
    "StepRecord",
    "TokenRangeRetentionConfig",
    "TorchLlmArgs",
    "greedy_decode",
]
