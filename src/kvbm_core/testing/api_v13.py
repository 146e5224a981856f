"""The connector dataclasses as TensorRT-LLM 1.3+ shapes them (``connectors/kv_cache_connector.py``).

1.3 keeps the five 1.2 fields of ``RequestData`` in order and appends ``block_hashes`` (the
cumulative chain of full-block hashes of beam 0), ``priorities`` (per new block id; ``None``
without a retention config), ``cache_salt`` (the request's salt string) and
``new_block_ids_by_layer_group`` (empty for a single flat block space). ``SchedulerOutput`` gains
``attention_dp_rank`` (``None`` on the tensor-parallel path). Connectors should read every field
after the fifth by name: the order differed between 1.3 pre-releases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class RequestDataV13:
    request_id: int
    new_tokens: List[int]
    new_block_ids: List[int]
    computed_position: int
    num_scheduled_tokens: int
    block_hashes: List[int] = field(default_factory=list)
    priorities: Optional[List[int]] = None
    cache_salt: Optional[str] = None
    new_block_ids_by_layer_group: List[List[int]] = field(default_factory=list)


@dataclass
class SchedulerOutputV13:
    new_requests: List[RequestDataV13] = field(default_factory=list)
    cached_requests: List[RequestDataV13] = field(default_factory=list)
    attention_dp_rank: Optional[int] = None
