"""The ``llm_args`` the reference executor hands to connector constructors (TRT-LLM's ``TorchLlmArgs``).

Only the fields connectors read are present, under TRT-LLM's names. How a rank learns its rank:
exactly as in TRT-LLM, ``llm_args.parallel_config.to_mapping().rank``. The scheduler and rank 0's
worker receive the *same* object (in TRT-LLM they share a process, and kvbm pairs them by object
identity); every other rank's worker receives its own copy whose mapping names that rank, as an MPI
rank would after deserialising its arguments (:func:`rank_view`).
"""

from __future__ import annotations

from typing import Any

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Mapping:
    """TRT-LLM's parallel mapping of one rank. Pipeline and context parallelism are always 1."""

    world_size: int
    rank: int
    tp_size: int
    pp_size: int = 1
    cp_size: int = 1

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return 0


@dataclass(frozen=True)
class ParallelConfig:
    tp_size: int
    pp_size: int = 1
    rank: int = 0  # the rank this copy of the arguments belongs to

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def to_mapping(self) -> Mapping:
        return Mapping(world_size=self.world_size, rank=self.rank, tp_size=self.tp_size, pp_size=self.pp_size)


@dataclass(frozen=True)
class KvCacheConfig:
    tokens_per_block: int = 32
    enable_block_reuse: bool = True
    enable_partial_reuse: bool = False  # the reference KV manager reuses whole blocks only
    copy_on_partial_reuse: bool = True
    free_gpu_memory_fraction: float = 0.9
    host_cache_size: int | None = None
    max_tokens: int | None = None
    dtype: str = "auto"


@dataclass(frozen=True)
class KvCacheConnectorConfig:
    connector_module: str
    connector_scheduler_class: str
    connector_worker_class: str


@dataclass(frozen=True)
class CudaGraphConfig:
    max_batch_size: int = 0
    enable_padding: bool = False


@dataclass(frozen=True)
class TorchLlmArgs:
    model: str
    tensor_parallel_size: int
    parallel_config: ParallelConfig
    kv_cache_config: KvCacheConfig
    kv_connector_config: KvCacheConnectorConfig | None
    max_seq_len: int
    max_batch_size: int
    max_num_tokens: int
    enable_chunked_prefill: bool
    disable_overlap_scheduler: bool
    cuda_graph_config: CudaGraphConfig | None
    dtype: str  # the model's dtype
    kv_cache_dtype: str  # the pool tensor's dtype
    pipeline_parallel_size: int = 1
    max_beam_width: int = 1
    backend: str = "pytorch"
    gpus_per_node: int | None = None
    cache_transceiver_config: Any = None  # disaggregated serving: an object with ``backend`` (UCX, NIXL, ...)


def rank_view(llm_args: TorchLlmArgs, rank: int) -> TorchLlmArgs:
    """The arguments as rank ``rank`` sees them: ``llm_args`` itself for rank 0, else a copy."""
    if rank == llm_args.parallel_config.rank:
        return llm_args
    return dataclasses.replace(llm_args, parallel_config=dataclasses.replace(llm_args.parallel_config, rank=rank))
