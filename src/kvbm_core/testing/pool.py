"""The device KV pools of the simulated ranks, in TensorRT-LLM's primary-pool layout.

Each rank owns one tensor ``[num_blocks, num_layers, 2, heads_per_rank * tokens_per_block *
head_dim]``: block-major, so one block (all layers, K then V) is one contiguous run of bytes, and
inside a block and layer each of K and V is head-major ``[heads, tokens_per_block, head_dim]`` (HND).
Tensor parallelism splits the KV heads evenly: rank ``r`` holds heads ``[r*h, (r+1)*h)``. Block ids
are the same on every rank. This module only addresses bytes; which block belongs to whom is the
KV cache manager's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbm_core.errors import ConfigError


@dataclass(frozen=True)
class PoolGeometry:
    """How many blocks, and how one block of one rank is laid out."""

    num_blocks: int
    num_layers: int
    num_kv_heads: int  # all ranks together
    head_dim: int
    tokens_per_block: int
    tp_size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.num_kv_heads % self.tp_size:
            raise ConfigError(
                "tensor_parallel_size",
                f"{self.tp_size} does not divide the model's {self.num_kv_heads} KV heads",
            )
        if self.num_blocks <= 0:
            raise ConfigError("num_blocks", f"the pool needs at least one block, got {self.num_blocks}")

    @property
    def heads_per_rank(self) -> int:
        return self.num_kv_heads // self.tp_size

    @property
    def elems_per_block(self) -> int:
        return self.heads_per_rank * self.tokens_per_block * self.head_dim


class KvPools:
    """One pool tensor per rank, plus the token-level reads and writes the model needs."""

    def __init__(self, geometry: PoolGeometry, device: torch.device | str):
        self.geometry = geometry
        g = geometry
        self.tensors: list[torch.Tensor] = [
            torch.zeros((g.num_blocks, g.num_layers, 2, g.elems_per_block), dtype=g.dtype, device=device)
            for _ in range(g.tp_size)
        ]
        # [blocks, layers, kv, heads, tokens, head_dim] views of the same storage
        self._views = [
            t.view(g.num_blocks, g.num_layers, 2, g.heads_per_rank, g.tokens_per_block, g.head_dim)
            for t in self.tensors
        ]

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def write(
        self, layer: int, block_table: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store K/V ``[n, num_kv_heads, head_dim]`` of sequence ``positions`` (int64 ``[n]``)."""
        tpb = self.geometry.tokens_per_block
        blocks = block_table[positions // tpb]
        offsets = positions % tpb
        h = self.geometry.heads_per_rank
        for rank, view in enumerate(self._views):
            heads = slice(rank * h, (rank + 1) * h)
            view[blocks, layer, 0, :, offsets, :] = k[:, heads].to(view.dtype)
            view[blocks, layer, 1, :, offsets, :] = v[:, heads].to(view.dtype)

    def read(
        self, layer: int, block_table: torch.Tensor, length: int, padded_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[num_kv_heads, L, head_dim]`` of positions ``[0, length)``, all ranks' heads.

        With ``padded_length``, ``L`` is that many positions and everything past ``length`` is zero.
        """
        g = self.geometry
        tpb, h = g.tokens_per_block, g.heads_per_rank
        nblocks = -(-length // tpb)
        ids = block_table[:nblocks]
        size = length if padded_length is None else padded_length
        out = torch.empty((2, g.num_kv_heads, max(size, nblocks * tpb), g.head_dim), dtype=g.dtype, device=self.device)
        blocks = out[:, :, : nblocks * tpb].view(2, g.num_kv_heads, nblocks, tpb, g.head_dim)
        for rank, view in enumerate(self._views):  # one gather per rank, then one copy into place
            blocks[:, rank * h : (rank + 1) * h].copy_(view[ids, layer].permute(1, 2, 0, 3, 4))
        if padded_length is not None:
            out[:, :, length:].zero_()
        return out[0, :, :size], out[1, :, :size]
