"""Shapes of the reference decoder: the named presets and the KV bytes each one produces.

A shape fixes everything that changes the KV pool's bytes (layers, KV heads, head size, dtype), so
the presets for real models produce exactly their KV per token even though the weights are random.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbm_core.errors import ConfigError

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelShape:
    """A Llama/Qwen3-style decoder: embedding, ``num_layers`` x (attention + SwiGLU MLP), LM head."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    dtype: str = "float32"
    qk_norm: bool = False  # Qwen3 normalises q and k per head before RoPE
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dtype not in _TORCH_DTYPES:
            raise ConfigError(f"ModelShape({self.name}).dtype", f"got {self.dtype!r}", _TORCH_DTYPES)
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(
                f"ModelShape({self.name}).num_q_heads",
                f"{self.num_q_heads} is not a multiple of num_kv_heads={self.num_kv_heads}",
            )
        if self.head_dim % 2:
            raise ConfigError(f"ModelShape({self.name}).head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token occupies in the pool, all layers, K and V, all ranks together."""
        elem = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * elem


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(
        name="tiny",
        vocab_size=512,
        hidden_size=64,
        num_layers=3,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
    ),
    "qwen3-0.6b": ModelShape(
        name="qwen3-0.6b",
        vocab_size=151936,
        hidden_size=1024,
        num_layers=28,
        num_q_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=3072,
        dtype="bfloat16",
        qk_norm=True,
        rope_theta=1_000_000.0,
    ),
    "llama-3-8b": ModelShape(
        name="llama-3-8b",
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        dtype="bfloat16",
        rope_theta=500_000.0,
        rms_eps=1e-5,
    ),
}


def resolve_shape(shape: str | ModelShape) -> ModelShape:
    """A preset by name, or the shape itself."""
    if isinstance(shape, ModelShape):
        return shape
    try:
        return PRESETS[shape]
    except KeyError:
        raise ConfigError("model", f"unknown reference model preset {shape!r}", PRESETS) from None
