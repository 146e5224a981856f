"""kvbm's TensorRT-LLM KV cache connector: ``connector_module: kvbm_core.trtllm.connector``.

Two classes, as TRT-LLM's PyTorch backend expects (``kv_connector_config``):

- :class:`KvbmConnectorLeader` (:mod:`kvbm_core.trtllm.leader`; scheduler side, rank 0 only) turns
  engine callbacks into calls on the :class:`~kvbm_core.leader.BlockManager` and returns its
  :class:`~kvbm_core.ops.StepOps` as the per-step metadata (small, picklable: TRT-LLM broadcasts
  it to every rank).
- :class:`KvbmConnectorWorker` (:mod:`kvbm_core.trtllm.worker`; every rank) executes those
  operations on the rank's KV pool through the :class:`~kvbm_core.worker.TransferEngine`.

What both read from TensorRT-LLM's objects is in :mod:`kvbm_core.trtllm.engine_args`; the engine
settings they refuse in :mod:`kvbm_core.trtllm.engine_checks`. ``DynamoKVBMConnectorLeader`` /
``DynamoKVBMConnectorWorker`` are aliases, so a YAML written for Dynamo's KVBM works by changing
only ``connector_module``.

Choices (documented for users in the README, "How kvbm behaves in the engine"):

- **Loads** are synchronous, from host memory only: ``start_load_kv`` queues the host -> device
  copies on a load stream, layer by layer where batched copies exist, and the compute stream waits
  for layer ``l``'s copies in ``wait_for_layer_load(l)`` (GPU-side, no host sync); else for all of
  them before the forward pass. Disk blocks are staged into host slots and verified on every rank
  while the leader answers ``get_num_new_matched_tokens`` (:mod:`kvbm_core.leader.manager`,
  "Staging before promising"), so a promise never rests on bytes nobody checked.
- **Stores** copy after the forward pass wrote the KV: the forward-pass callable (or
  ``wait_for_save`` where the engine has no callable) records an event on the compute stream, and
  the copies wait on it GPU-side. They are issued in ``get_finished``, once the engine has queued
  its read of the sampled tokens, so that read never waits behind them on the device -> host copy
  engine. They never block the forward path.
- **Device blocks are never pinned** for a store: ``request_finished`` returns False, and the
  engine frees the request's blocks at once. A freed block a store still reads can be handed to
  another request only in a later step, and every block handed out in a step is listed in that
  step's metadata (``StepOps.fresh_blocks``): each rank's ``start_load_kv`` makes the compute
  stream wait for its own operations on those blocks before the forward pass writes them. Where
  the engine writes freed blocks outside the forward pass (partial reuse with copies; KV arriving
  from a context server), kvbm holds them instead (``request_finished`` is True while a store of
  the request is in flight), and ``get_finished`` reports at most one finished save per call, in
  the order the requests finished, the same on every rank, so that 1.2's loop releases every one.
- **A failed load** of a promised block (only a host -> device copy that did not happen: the bytes
  were verified before the promise; or a forward pass that did not wait for every layer's load) is
  never reported as loaded: the worker raises :class:`~kvbm_core.errors.KvbmLoadError` from the
  next ``wait_for_layer_load`` (or ``wait_for_save``), inside TensorRT-LLM's forward pass, whose
  error handling fails the batch; never from ``get_finished`` or ``start_load_kv``, where an
  exception ends TensorRT-LLM's executor.
- **Unsupported engine settings** are configuration errors at construction; partial reuse on is
  logged once. Multimodal and generation-only requests are left alone (no match, no offload).
- ``supports_attention_dp`` is False on both classes: TensorRT-LLM 1.3+ refuses attention DP too.
"""

from kvbm_core.trtllm.leader import KvbmConnectorLeader, PipelineInfo
from kvbm_core.trtllm.worker import KvbmConnectorWorker

DynamoKVBMConnectorLeader = KvbmConnectorLeader
DynamoKVBMConnectorWorker = KvbmConnectorWorker

__all__ = [
    "DynamoKVBMConnectorLeader",
    "DynamoKVBMConnectorWorker",
    "KvbmConnectorLeader",
    "KvbmConnectorWorker",
    "PipelineInfo",
]
