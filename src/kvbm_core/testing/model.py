"""The reference decoder: a Llama/Qwen3-style model in plain torch that keeps its KV in the paged pool.

Weights are random but fixed by a seed. A forward pass takes the scheduled pieces of a batch (one
request each: block table, start position, tokens to compute), writes their K/V into the pool and
attends over the prefix *read back from the pool*, so KV that a connector onboarded is really used
and wrong bytes change the output. Per decoder layer ``i`` it calls ``pre_hook(i)`` before the
layer's work and ``post_hook(i)`` after it, as TRT-LLM's forward hooks do; sampling is greedy.

In *invariant* mode (the default on CPU) every request is computed on its own, every matmul has at
least two rows and attention always spans ``max_seq_len`` keys (masked), so a token's KV does not
depend on how its prompt was chunked, reused or batched: on CPU float32 the bytes are identical
whether a prefix was computed in this run, device-reused, or loaded. Otherwise (the GPU default)
the batch runs as one: norms, projections and the MLP over all its rows at once, attention piece by
piece through ``scaled_dot_product_attention``, as an engine batches; a token's KV then depends on
what it was batched with (deterministic for a fixed schedule only).
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
        for piece in pieces:
            end = piece.start + len(piece.tokens)
            if end == piece.start:
                raise ValueError("a piece must compute at least one token")
            if end > self.max_seq_len:
                raise ValueError(f"position {end - 1} is beyond max_seq_len={self.max_seq_len}")
        groups = [[p] for p in pieces] if self.invariant else [list(pieces)] if pieces else []
        states = [self._start(group) for group in groups]
        for i, layer in enumerate(self.layers):
            if pre_hook is not None:
                pre_hook(i)
            for st in states:
                st.h = self._layer(layer, i, st, pools)
            if post_hook is not None:
                post_hook(i)
        return [token for st in states for token in self._sample(st)]

    # -- one group of pieces ---------------------------------------------------------------------

    def _start(self, group: Sequence[Piece]) -> _GroupState:
        """Row layout of a group: its pieces' rows side by side (two equal rows for a one-token
        piece in invariant mode, where one-row matmuls would take a different kernel)."""
        tokens: list[int] = []
        positions: list[int] = []
        tables: list[int] = []
        layout: list[tuple[int, int, int]] = []  # per piece: first row, rows, end of its table entries
        for piece in group:
            n = len(piece.tokens)
            rows = 2 if self.invariant and n == 1 else n
            first_row = len(tokens)
            tokens += list(piece.tokens) * (rows // n)
            positions += list(range(piece.start, piece.start + n)) * (rows // n)
            tables += piece.block_table
            layout.append((first_row, rows, len(tables)))
        dev = self.device
        token_ids = torch.tensor(tokens, dtype=torch.long, device=dev)
        all_tables = torch.tensor(tables, dtype=torch.long, device=dev)
        table_ends = [end for _, _, end in layout]
        table_starts = [0, *table_ends[:-1]]
        spans = [
            _Span(piece, row, rows, len(piece.tokens), piece.start + len(piece.tokens), all_tables[start:end])
            for piece, (row, rows, end), start in zip(group, layout, table_starts, strict=True)
        ]
        return _GroupState(spans, torch.tensor(positions, dtype=torch.long, device=dev), self.embed[token_ids])

    def _layer(self, layer: _Layer, index: int, st: _GroupState, pools: KvPools) -> torch.Tensor:
        """One decoder layer over every row of the group; only attention goes piece by piece."""
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
        outputs = []
        for span in st.spans:
            real = slice(span.row, span.row + span.num_real)
            pools.write(index, span.table, st.positions[real], k[real], v[real])
            own = slice(span.row, span.row + span.rows)
            outputs.append(self._attend(q[own], st.positions[own], pools, index, span))
        attn = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        h = st.h + attn @ layer.wo
        x = self._norm(h, layer.mlp_norm)
        gate, up = (x @ layer.wgu).chunk(2, dim=-1)
        return h + (F.silu(gate) * up) @ layer.wdown

    def _attend(
        self, q: torch.Tensor, query_positions: torch.Tensor, pools: KvPools, layer: int, span: _Span
    ) -> torch.Tensor:
        s = self.shape
        rows, hq, d = q.shape
        hkv = s.num_kv_heads
        group = hq // hkv
        scale = d**-0.5
        if self.invariant:
            keys, values = pools.read(layer, span.table, span.end, padded_length=self.max_seq_len)
            qg = q.permute(1, 0, 2).reshape(hkv, group * rows, d)  # q heads sharing a KV head
            scores = torch.bmm(qg.float(), keys.float().transpose(1, 2)) * scale
            key_pos = torch.arange(self.max_seq_len, device=q.device)
            masked = (key_pos[None, :] > query_positions[:, None]).repeat(group, 1)
            scores.masked_fill_(masked, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out = torch.bmm(probs, values.float()).to(q.dtype)  # [hkv, group*rows, d]
            return out.reshape(hq, rows, d).permute(1, 0, 2).reshape(rows, hq * d)
        keys, values = pools.read(layer, span.table, span.end)
        q4 = q.permute(1, 0, 2).unsqueeze(0)
        k4 = keys.repeat_interleave(group, 0).unsqueeze(0)  # equal head counts keep flash attention eligible
        v4 = values.repeat_interleave(group, 0).unsqueeze(0)
        if rows == span.end or rows == 1:  # causal from position 0, or one query that sees every key
            out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=rows > 1)
        else:  # a chunk after a prefix: the queries are the last ``rows`` positions
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=causal_lower_right(rows, span.end))
        return out[0].permute(1, 0, 2).reshape(rows, hq * d)

    def _sample(self, st: _GroupState) -> list[torch.Tensor | None]:
        """Greedy next tokens of the group's sampling pieces, ``None`` for the others."""
        last_rows = [span.row + span.num_real - 1 for span in st.spans if span.piece.sample]
        if not last_rows:
            return [None] * len(st.spans)
        last = self._norm(st.h[last_rows], self.final_norm)
        if self.invariant:  # one piece: two equal rows, for the same matmul kernel as every other step
            last = last.expand(2, -1)
        picked = iter(torch.argmax(last @ self.lm_head, dim=-1))
        return [next(picked) if span.piece.sample else None for span in st.spans]

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


class _Span:
    """Where one piece's rows lie inside its group, and its block table."""

    __slots__ = ("end", "num_real", "piece", "row", "rows", "table")

    def __init__(self, piece: Piece, row: int, rows: int, num_real: int, end: int, table: torch.Tensor):
        self.piece = piece
        self.row = row
        self.rows = rows
        self.num_real = num_real  # rows beyond num_real repeat the last one (invariant mode)
        self.end = end  # the sequence length once this piece is written
        self.table = table


class _GroupState:
    """Pieces computed together: their residual stream side by side and their positions."""

    __slots__ = ("h", "positions", "spans")

    def __init__(self, spans: list[_Span], positions: torch.Tensor, h: torch.Tensor):
        self.spans = spans
        self.positions = positions
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
