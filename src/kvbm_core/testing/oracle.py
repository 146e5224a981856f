"""Ground truth for reused and onboarded KV: recompute the prefix from scratch and compare the bytes.

When a request's first chunk starts after a prefix it did not compute (device reuse, a connector
load, or both), the oracle recomputes that prefix with no reuse at all in a scratch pool. Just
before each decoder layer runs (after the connector's ``wait_for_layer_load``), the executor asks it
to compare that layer's K and V of the prefix, read from every rank's pool, with the recomputation.
With ``tolerance == 0`` the comparison is bit-exact, which the model's ``exact`` and
``batch_invariant`` modes guarantee; with its ``fast`` mode pass a small tolerance, since
recomputation there may round differently.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvbm_core.testing.errors import OracleMismatch
from kvbm_core.testing.model import Piece, ReferenceModel
from kvbm_core.testing.pool import KvPools

PrefixTruth = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V [num_kv_heads, tokens, head_dim]


class KvOracle:
    def __init__(self, model: ReferenceModel, tokens_per_block: int, tolerance: float = 0.0):
        self.model = model
        self.tokens_per_block = tokens_per_block
        self.tolerance = tolerance

    def truth(self, tokens: Sequence[int]) -> PrefixTruth:
        """Every layer's K and V of ``tokens``, computed in one pass over a fresh scratch pool."""
        nblocks = -(-len(tokens) // self.tokens_per_block)
        scratch = KvPools(self.model.pool_geometry(nblocks, self.tokens_per_block), self.model.device)
        self.model.forward([Piece(range(nblocks), 0, tokens, False)], scratch)
        table = torch.arange(nblocks, device=self.model.device)
        return [scratch.read(layer, table, len(tokens)) for layer in range(self.model.shape.num_layers)]

    def check(self, request_id: int, layer: int, pools: KvPools, block_ids: Sequence[int], truth: PrefixTruth) -> None:
        """Raise :class:`OracleMismatch` unless ``layer``'s prefix KV in ``pools`` equals the truth."""
        expected_k, expected_v = truth[layer]
        length = expected_k.shape[1]
        table = torch.tensor(list(block_ids), dtype=torch.long, device=pools.device)
        k, v = pools.read(layer, table, length)
        for kind, got, expected in (("K", k, expected_k), ("V", v, expected_v)):
            if self.tolerance == 0.0:
                bad = got != expected
            else:
                bad = ~torch.isclose(got.float(), expected.float(), rtol=self.tolerance, atol=self.tolerance)
            if bool(bad.any()):
                position = int(torch.nonzero(bad.any(dim=2).any(dim=0))[0])
                head = int(torch.nonzero(bad[:, position].any(dim=-1))[0])
                diff = float((got.float() - expected.float()).abs().max())
                rank = head // pools.geometry.heads_per_rank
                raise OracleMismatch(request_id, layer, kind, rank, position, diff)
