"""The reference decoder: a Llama/Qwen3-style model in plain torch that keeps its KV in the paged pool.

Weights are random but fixed by a seed. A forward pass takes the scheduled pieces of a batch (one
request each: block table, start position, tokens to compute), writes their K/V into the pool and
attends over the prefix *read back from the pool*, so KV that a connector onboarded is really used
and wrong bytes change the output. Per decoder layer ``i`` it calls ``pre_hook(i)`` before the
layer's work and ``post_hook(i)`` after it, as TRT-LLM's forward hooks do; sampling is greedy.

Every request is computed on its own. In *invariant* mode (the default on CPU) every matmul has at
least two rows and attention always spans ``max_seq_len`` keys (masked), so a token's KV does not
depend on how its prompt was chunked, reused or batched: on CPU float32 the bytes are identical
whether a prefix was computed in this run, device-reused, or loaded. Otherwise attention runs
through ``scaled_dot_product_attention`` (fast on GPU; deterministic for a fixed schedule only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvbm_core.testing.pool import KvPools, PoolGeometry
from kvbm_core.testing.shapes import ModelShape, resolve_shape

LayerHook = Callable[[int], None]


@dataclass(frozen=True)
class Piece:
    """One request's share of a forward pass: ``tokens`` at positions ``start, start+1, ...``."""

    block_table: Sequence[int]  # the request's block ids (beam 0); covers every position written
    start: int
    tokens: Sequence[int]
    sample: bool  # the last prompt chunk or a decode step: return the next token


@dataclass(frozen=True)
class _Layer:
    attn_norm: torch.Tensor
    wqkv: torch.Tensor  # [hidden, (q_heads + 2 kv_heads) * head_dim], used as x @ w
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    wo: torch.Tensor
    mlp_norm: torch.Tensor
    wgu: torch.Tensor  # gate and up, side by side
    wdown: torch.Tensor


class ReferenceModel:
    """Seeded random weights of ``shape`` on ``device``; see the module docstring."""

    def __init__(
        self,
        shape: str | ModelShape = "tiny",
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        max_seq_len: int = 4096,
        invariant: bool | None = None,
    ):
        self.shape = s = resolve_shape(shape)
        self.device = torch.device(device)
        self.max_seq_len = max_seq_len
        self.invariant = self.device.type == "cpu" if invariant is None else invariant
        self.seed = seed
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        dt = s.torch_dtype

        def rand(rows: int, cols: int, std: float) -> torch.Tensor:
            w = torch.randn((rows, cols), generator=gen, device=self.device, dtype=torch.float32)
            return (w * std).to(dt)

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, dtype=dt, device=self.device)

        h, d = s.hidden_size, s.head_dim
        qkv_cols = (s.num_q_heads + 2 * s.num_kv_heads) * d
        self.embed = rand(s.vocab_size, h, 1.0)
        self.layers = [
            _Layer(
                attn_norm=ones(h),
                wqkv=rand(h, qkv_cols, h**-0.5),
                q_norm=ones(d) if s.qk_norm else None,
                k_norm=ones(d) if s.qk_norm else None,
                wo=rand(s.num_q_heads * d, h, (s.num_q_heads * d) ** -0.5),
                mlp_norm=ones(h),
                wgu=rand(h, 2 * s.intermediate_size, h**-0.5),
                wdown=rand(s.intermediate_size, h, s.intermediate_size**-0.5),
            )
            for _ in range(s.num_layers)
        ]
        self.final_norm = ones(h)
        self.lm_head = rand(h, s.vocab_size, h**-0.5)
        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, d, 2, device=self.device, dtype=torch.float32) / d))
        angles = torch.outer(torch.arange(max_seq_len, device=self.device, dtype=torch.float32), inv_freq)
        self._cos, self._sin = angles.cos(), angles.sin()

    def pool_geometry(self, num_blocks: int, tokens_per_block: int, tp_size: int = 1) -> PoolGeometry:
        s = self.shape
        return PoolGeometry(
            num_blocks, s.num_layers, s.num_kv_heads, s.head_dim, tokens_per_block, tp_size, s.torch_dtype
        )

    @torch.no_grad()  # not inference_mode: tensors a connector creates in its layer hooks stay ordinary
    def forward(
        self,
        pieces: Sequence[Piece],
        pools: KvPools,
        *,
        pre_hook: LayerHook | None = None,
        post_hook: LayerHook | None = None,
    ) -> list[torch.Tensor | None]:
        """Compute ``pieces``, writing their KV into ``pools``.

        Returns, per piece, the greedy next token as a 0-d tensor on the model's device (``None``
        for pieces that do not sample). Reading it (``int(t)``) waits for the forward pass.
        """
        states = [self._start(p) for p in pieces]
        for i, layer in enumerate(self.layers):
            if pre_hook is not None:
                pre_hook(i)
            for st in states:
                st.h = self._layer(layer, i, st, pools)
            if post_hook is not None:
                post_hook(i)
        return [self._sample(st) if st.piece.sample else None for st in states]

    # -- one request ----------------------------------------------------------------------------

    def _start(self, piece: Piece) -> _PieceState:
        n = len(piece.tokens)
        if n == 0:
            raise ValueError("a piece must compute at least one token")
        end = piece.start + n
        if end > self.max_seq_len:
            raise ValueError(f"position {end - 1} is beyond max_seq_len={self.max_seq_len}")
        tokens = torch.tensor(list(piece.tokens), dtype=torch.long, device=self.device)
        positions = torch.arange(piece.start, end, dtype=torch.long, device=self.device)
        if self.invariant and n == 1:  # one-row matmuls take a different kernel: compute two equal rows
            tokens, positions = tokens.repeat(2), positions.repeat(2)
        table = torch.tensor(list(piece.block_table), dtype=torch.long, device=self.device)
        return _PieceState(piece, n, end, positions, table, self.embed[tokens])

    def _layer(self, layer: _Layer, index: int, st: _PieceState, pools: KvPools) -> torch.Tensor:
        s = self.shape
        d, hq, hkv = s.head_dim, s.num_q_heads, s.num_kv_heads
        x = self._norm(st.h, layer.attn_norm)
        qkv = x @ layer.wqkv
        rows = qkv.shape[0]
        q = qkv[:, : hq * d].reshape(rows, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].reshape(rows, hkv, d)
        v = qkv[:, (hq + hkv) * d :].reshape(rows, hkv, d)
        if layer.q_norm is not None:
            q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
        q, k = self._rope(q, st.positions), self._rope(k, st.positions)
        real = st.num_real
        pools.write(index, st.table, st.positions[:real], k[:real], v[:real])
        attn = self._attend(q, pools, index, st)
        h = st.h + attn @ layer.wo
        x = self._norm(h, layer.mlp_norm)
        gate, up = (x @ layer.wgu).chunk(2, dim=-1)
        return h + (F.silu(gate) * up) @ layer.wdown

    def _attend(self, q: torch.Tensor, pools: KvPools, layer: int, st: _PieceState) -> torch.Tensor:
        s = self.shape
        rows, hq, d = q.shape
        hkv = s.num_kv_heads
        group = hq // hkv
        scale = d**-0.5
        if self.invariant:
            keys, values = pools.read(layer, st.table, st.end, padded_length=self.max_seq_len)
            qg = q.permute(1, 0, 2).reshape(hkv, group * rows, d)  # q heads sharing a KV head
            scores = torch.bmm(qg.float(), keys.float().transpose(1, 2)) * scale
            key_pos = torch.arange(self.max_seq_len, device=q.device)
            masked = (key_pos[None, :] > st.positions[:, None]).repeat(group, 1)
            scores.masked_fill_(masked, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out = torch.bmm(probs, values.float()).to(q.dtype)  # [hkv, group*rows, d]
            return out.reshape(hq, rows, d).permute(1, 0, 2).reshape(rows, hq * d)
        keys, values = pools.read(layer, st.table, st.end)
        q4 = q.permute(1, 0, 2).unsqueeze(0)
        k4 = keys.repeat_interleave(group, 0).unsqueeze(0)  # equal head counts keep flash attention eligible
        v4 = values.repeat_interleave(group, 0).unsqueeze(0)
        if rows == st.end or rows == 1:  # causal from position 0, or one query that sees every key
            out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=rows > 1)
        else:  # a chunk after a prefix: the queries are the last ``rows`` positions
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=causal_lower_right(rows, st.end))
        return out[0].permute(1, 0, 2).reshape(rows, hq * d)

    def _sample(self, st: _PieceState) -> torch.Tensor:
        last = self._norm(st.h[st.num_real - 1 : st.num_real], self.final_norm)
        if self.invariant:
            last = last.expand(2, -1)
        logits = last @ self.lm_head
        return torch.argmax(logits[0])

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.shape.rms_eps)
        return (xf * weight.float()).to(x.dtype)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos = self._cos[positions][:, None, :]
        sin = self._sin[positions][:, None, :]
        half = x.shape[-1] // 2
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class _PieceState:
    """A piece in flight: its residual stream and the index tensors of its positions."""

    __slots__ = ("piece", "num_real", "end", "positions", "table", "h")

    def __init__(
        self, piece: Piece, num_real: int, end: int, positions: torch.Tensor, table: torch.Tensor, h: torch.Tensor
    ):
        self.piece = piece
        self.num_real = num_real
        self.end = end
        self.positions = positions
        self.table = table
        self.h = h


def greedy_decode(
    model: ReferenceModel, prompt: Sequence[int], max_new_tokens: int, tokens_per_block: int = 16
) -> list[int]:
    """Greedy tokens with no KV reuse at all: every step recomputes the whole sequence from scratch."""
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nblocks = -(-len(tokens) // tokens_per_block)
        pools = KvPools(model.pool_geometry(nblocks, tokens_per_block), model.device)
        (nxt,) = model.forward([Piece(range(nblocks), 0, tokens, True)], pools)
        assert nxt is not None
        out.append(int(nxt))
        tokens.append(int(nxt))
    return out
