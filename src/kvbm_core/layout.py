"""The shape of one KV block on one rank, as TensorRT-LLM's primary pool lays it out.

The pool is ``[num_blocks, num_layers, kv_factor, elems_per_block]`` and block-major, so one block
(all layers, K and V) is one contiguous run of ``bytes_per_block`` bytes. Both the leader (sizing,
block identity) and the workers (copies, disk slots) read the layout from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbm_core.errors import ConfigError

_DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


@dataclass(frozen=True)
class BlockLayout:
    """One block of one rank: ``num_layers x kv_factor x elems_per_block`` elements of ``dtype``."""

    num_layers: int
    kv_factor: int
    elems_per_block: int
    dtype: str
    tokens_per_block: int

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_BYTES:
            raise ConfigError("kv_cache dtype", f"unsupported dtype {self.dtype!r}", _DTYPE_BYTES)
        if self.kv_factor not in (1, 2):
            raise ConfigError("kv_factor", f"must be 1 (MLA) or 2 (K and V), got {self.kv_factor}")
        tpb = self.tokens_per_block
        if tpb <= 0 or tpb & (tpb - 1) or tpb > 1024:
            raise ConfigError("kv_cache_config.tokens_per_block", f"got {tpb}", "a power of two up to 1024")
        if self.num_layers <= 0 or self.elems_per_block <= 0:
            raise ConfigError("kv_cache pool", f"empty layout {self}")

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_block(self) -> int:
        return self.num_layers * self.kv_factor * self.elems_per_block * self.dtype_bytes

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.tokens_per_block

    @classmethod
    def from_pool(cls, pool: "torch.Tensor", tokens_per_block: int) -> "BlockLayout":  # noqa: F821
        """Derive the layout from TRT-LLM's primary pool tensor ``[blocks, layers, kv, elems...]``."""
        if pool.dim() < 4:
            raise ConfigError(
                "register_kv_caches",
                f"expected a [num_blocks, num_layers, kv_factor, elems] pool, got shape {tuple(pool.shape)}",
            )
        if not pool.is_contiguous():
            raise ConfigError("register_kv_caches", "the KV pool tensor must be contiguous")
        elems = 1
        for d in pool.shape[3:]:
            elems *= int(d)
        dtype = str(pool.dtype).removeprefix("torch.")
        return cls(int(pool.shape[1]), int(pool.shape[2]), elems, dtype, tokens_per_block)
