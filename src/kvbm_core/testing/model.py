"""The reference decoder: a Llama/Qwen3-style model in plain torch that keeps its KV in the paged pool.

Weights are random but fixed by a seed. A forward pass takes the scheduled pieces of a batch (one
request each: block table, start position, tokens to compute), writes their K/V into the pool and
attends over the prefix *read back from the pool*, so KV that a connector onboarded is really used
and wrong bytes change the output. Per decoder layer ``i`` it calls ``pre_hook(i)`` before the
layer's work and ``post_hook(i)`` after it, as TRT-LLM's forward hooks do; sampling is greedy.

Three modes (``mode=``; ``None`` picks ``exact`` on CPU and ``fast`` on CUDA):

- ``exact``: fixed-point values held in float64 whose sums are exact, so no kernel choice, blocking
  or summation order can change a result (:mod:`kvbm_core.testing.exact` gives the argument). A
  token's KV and logits are the same bytes however its prompt was chunked, whatever it was batched
  with and whether its prefix was computed or loaded; this holds on any CPU and on a GPU. The tests
  run it.
- ``batch_invariant``: the shape's dtype (bfloat16 for the real models) and torch's own kernels,
  every one called at a fixed shape. Norms, projections, RoPE, the MLP and the LM head run on tiles
  of exactly ``tiles[0]`` rows (the batch's rows padded with dummy rows); attention runs one piece
  at a time on tiles of ``tiles[1]`` queries, against the piece's keys and values read back from
  the pool and zero-padded to a fixed length (``max_seq_len`` rounded up to 64), keys after each
  query's position masked, so a query's softmax and its sum over values always span the same key
  slots; on a GPU an elementwise kernel computes every element by the same code. A row's result
  then depends only on its own inputs, provided that a kernel called at one shape reduces each
  output row in the same order whatever the other rows hold and wherever the row sits in the call
  (batch invariance: GEMM, softmax and row-reduction kernels pick their reduction order from the
  shape, not from the values); ``benchmarks/gpu/model_modes.py`` checks this on the GPU. On CPU
  the tiles are one row each (``tiles=(1, 1)``): every row goes through the same calls at the same
  places (so also through the same vector or scalar loop of an elementwise kernel), and the
  proviso reduces to "the same call gives the same result". Meant for ``kvbm bench`` on a GPU,
  where outputs with and without kvbm should be equal.
- ``fast``: the batch runs as one (norms, projections and the MLP over all its rows at once,
  attention piece by piece through ``scaled_dot_product_attention``), as an engine batches; a
  token's KV then depends on what it was batched with (deterministic for a fixed schedule only).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvbm_core.errors import ConfigError
from kvbm_core.testing import exact
from kvbm_core.testing.pool import KvPools, PoolGeometry
from kvbm_core.testing.shapes import ModelShape, resolve_shape

LayerHook = Callable[[int], None]
MODEL_MODES = ("exact", "batch_invariant", "fast")
BATCH_INVARIANT_TILES = {"cpu": (1, 1), "cuda": (128, 32)}  # (rows per matmul tile, queries per attention tile)
_KEY_PADDING = 64  # batch_invariant attention spans max_seq_len keys rounded up to this
_EXACT_ROWS = 4096  # exact mode computes at most this many rows per call (memory only: rows are independent)


def default_mode(device: str | torch.device) -> str:
    """The mode ``mode=None`` picks: ``exact`` on CPU, ``fast`` elsewhere."""
    return "exact" if torch.device(device).type == "cpu" else "fast"


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


class _FloatOps:
    """The ``fast`` and ``batch_invariant`` arithmetic: the shape's dtype and torch's kernels."""

    def __init__(self, eps: float):
        self.eps = eps

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * weight.float()).to(x.dtype)

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def values(self, v: torch.Tensor) -> torch.Tensor:
        return v

    def stored(self, kv: torch.Tensor) -> torch.Tensor:
        return kv

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up

    def add(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return h + delta


class _ExactOps:
    """The ``exact`` arithmetic (:mod:`kvbm_core.testing.exact`): every result is on its grid."""

    def __init__(self, eps: float, tables: exact.Tables):
        self.eps = eps
        self.tables = tables

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return exact.rms_norm(x, weight, self.eps)

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w  # both on their grids: the exact sum

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return exact.rope(x, cos, sin)

    def values(self, v: torch.Tensor) -> torch.Tensor:
        return exact.activations(v)

    def stored(self, kv: torch.Tensor) -> torch.Tensor:
        return kv.float()  # exact for grid values; a bfloat16 pool then rounds float32 -> bfloat16

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return exact.silu_mul(gate, up, self.tables)

    def add(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return exact.residual(h, delta)


class ReferenceModel:
    """Seeded random weights of ``shape`` on ``device``; see the module docstring.

    ``mode``: one of :data:`MODEL_MODES`, or ``None`` for :func:`default_mode`. ``tiles``
    (``batch_invariant`` only): rows per matmul tile and queries per attention tile; ``None`` takes
    :data:`BATCH_INVARIANT_TILES` for the device.
    """

    def __init__(
        self,
        shape: str | ModelShape = "tiny",
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        max_seq_len: int = 4096,
        mode: str | None = None,
        tiles: tuple[int, int] | None = None,
    ):
        self.shape = s = resolve_shape(shape)
        self.device = torch.device(device)
        self.max_seq_len = max_seq_len
        self.mode = default_mode(self.device) if mode is None else mode
        if self.mode not in MODEL_MODES:
            raise ConfigError("model_mode", f"unknown reference model mode {mode!r}", MODEL_MODES)
        if tiles is not None and self.mode != "batch_invariant":
            raise ConfigError("tiles", f"only the batch_invariant mode uses tiles, not {self.mode!r}")
        if self.mode == "batch_invariant":
            tiles = tiles or BATCH_INVARIANT_TILES.get(self.device.type, BATCH_INVARIANT_TILES["cuda"])
            if len(tiles) != 2 or min(tiles) < 1:
                raise ConfigError("tiles", f"two positive tile sizes (rows, queries), got {tiles!r}")
        if self.mode == "exact":
            exact.check_shape(s.hidden_size, s.head_dim, max_seq_len)
        self.tiles = tiles
        self.seed = seed
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        dt = s.torch_dtype
        is_exact = self.mode == "exact"

        def rand(rows: int, cols: int, std: float) -> torch.Tensor:
            w = torch.randn((rows, cols), generator=gen, device=self.device, dtype=torch.float32)
            return (w * std).to(dt)

        def matrix(rows: int, cols: int, std: float) -> torch.Tensor:
            w = rand(rows, cols, std)
            return exact.weights(w) if is_exact else w

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, dtype=torch.float64 if is_exact else dt, device=self.device)

        h, d = s.hidden_size, s.head_dim
        qkv_cols = (s.num_q_heads + 2 * s.num_kv_heads) * d
        embed = rand(s.vocab_size, h, 1.0)
        self.embed = exact.activations(embed) if is_exact else embed
        self.layers = [
            _Layer(
                attn_norm=ones(h),
                wqkv=matrix(h, qkv_cols, h**-0.5),
                q_norm=ones(d) if s.qk_norm else None,
                k_norm=ones(d) if s.qk_norm else None,
                wo=matrix(s.num_q_heads * d, h, (s.num_q_heads * d) ** -0.5),
                mlp_norm=ones(h),
                wgu=matrix(h, 2 * s.intermediate_size, h**-0.5),
                wdown=matrix(s.intermediate_size, h, s.intermediate_size**-0.5),
            )
            for _ in range(s.num_layers)
        ]
        self.final_norm = ones(h)
        self.lm_head = matrix(h, s.vocab_size, h**-0.5)
        table_dtype = torch.float64 if is_exact else torch.float32
        exponents = torch.arange(0, d, 2, device=self.device, dtype=table_dtype) / d
        inv_freq = 1.0 / (s.rope_theta**exponents)
        angles = torch.outer(torch.arange(max_seq_len, device=self.device, dtype=table_dtype), inv_freq)
        self._cos, self._sin = angles.cos(), angles.sin()  # computed once: a position's rotation is fixed
        self._ops = _ExactOps(s.rms_eps, exact.Tables(self.device)) if is_exact else _FloatOps(s.rms_eps)
        self._attend = {"exact": self._attend_exact, "batch_invariant": self._attend_tiled, "fast": self._attend_fast}[
            self.mode
        ]
        self._key_length = -(-max_seq_len // _KEY_PADDING) * _KEY_PADDING

    def save_weights(self, directory: str | Path) -> None:
        """Write the weights as a checkpoint directory (``config.json``, ``model.bin``: every tensor's
        bytes in a fixed order), so that an engine serving this model has weights on disk to fingerprint."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors = [self.embed, *(t for layer in self.layers for t in vars(layer).values() if t is not None),
                   self.final_norm, self.lm_head]
        with open(path / "model.bin", "wb") as f:
            for t in tensors:
                f.write(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        (path / "config.json").write_text(json.dumps({"shape": self.shape.name, "mode": self.mode}))

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
        batch = _Batch(pieces, self.device, self._row_tile()) if pieces else None
        h = self.embed[batch.token_ids] if batch is not None else None
        for i, layer in enumerate(self.layers):
            if pre_hook is not None:
                pre_hook(i)
            if batch is not None:
                h = self._layer(layer, i, batch, h, pools)
            if post_hook is not None:
                post_hook(i)
        return self._sample(batch, h) if batch is not None else []

    # -- row-wise work: all rows at once (fast), in slices (exact) or in fixed tiles (batch_invariant)

    def _row_tile(self) -> int:
        return self.tiles[0] if self.mode == "batch_invariant" else 1

    def _by_rows(self, fn: Callable[[slice], tuple[torch.Tensor, ...]], rows: int) -> tuple[torch.Tensor, ...]:
        """``fn`` over the rows ``[0, rows)``, outputs concatenated; ``rows`` is a multiple of the row tile."""
        step = {"exact": _EXACT_ROWS, "batch_invariant": self._row_tile(), "fast": rows}[self.mode]
        parts = [fn(slice(first, first + step)) for first in range(0, rows, step)]
        return parts[0] if len(parts) == 1 else tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))

    def _layer(self, layer: _Layer, index: int, batch: _Batch, h: torch.Tensor, pools: KvPools) -> torch.Tensor:
        """One decoder layer over every row of the batch; only attention goes piece by piece."""
        q, k, v = self._by_rows(lambda rows: self._qkv(layer, h[rows], batch.positions[rows]), len(h))
        outputs = []
        for span in batch.spans:
            real = slice(span.row, span.row + span.rows)
            pools.write(index, span.table, batch.positions[real], self._ops.stored(k[real]), self._ops.stored(v[real]))
            outputs.append(self._attend(q[real], batch.positions[real], pools, index, span))
        if batch.padding:
            outputs.append(q.new_zeros((batch.padding, q.shape[1] * q.shape[2])))
        attn = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        (h,) = self._by_rows(lambda rows: (self._mlp_block(layer, h[rows], attn[rows]),), len(h))
        return h

    def _qkv(self, layer: _Layer, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s, ops = self.shape, self._ops
        d, hq, hkv = s.head_dim, s.num_q_heads, s.num_kv_heads
        qkv = ops.linear(ops.norm(h, layer.attn_norm), layer.wqkv)
        rows = qkv.shape[0]
        q = qkv[:, : hq * d].reshape(rows, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].reshape(rows, hkv, d)
        v = qkv[:, (hq + hkv) * d :].reshape(rows, hkv, d)
        if layer.q_norm is not None:
            q, k = ops.norm(q, layer.q_norm), ops.norm(k, layer.k_norm)
        cos, sin = self._cos[positions][:, None, :], self._sin[positions][:, None, :]
        return ops.rope(q, cos, sin), ops.rope(k, cos, sin), ops.values(v)

    def _mlp_block(self, layer: _Layer, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        ops = self._ops
        h = ops.add(h, ops.linear(attn, layer.wo))
        gate, up = ops.linear(ops.norm(h, layer.mlp_norm), layer.wgu).chunk(2, dim=-1)
        return ops.add(h, ops.linear(ops.silu_mul(gate, up), layer.wdown))

    def _sample(self, batch: _Batch, h: torch.Tensor) -> list[torch.Tensor | None]:
        """Greedy next tokens of the batch's sampling pieces, ``None`` for the others."""
        last_rows = [span.row + span.rows - 1 for span in batch.spans if span.piece.sample]
        if not last_rows:
            return [None] * len(batch.spans)
        last_rows += [0] * (-len(last_rows) % self._row_tile())  # batch_invariant: whole tiles
        last = h[torch.tensor(last_rows, device=self.device)]
        ops = self._ops
        (tokens,) = self._by_rows(
            lambda rows: (torch.argmax(ops.linear(ops.norm(last[rows], self.final_norm), self.lm_head), dim=-1),),
            len(last),
        )
        picked = iter(tokens)
        return [next(picked) if span.piece.sample else None for span in batch.spans]

    # -- attention, one piece at a time: queries [rows, q_heads, head_dim] -> [rows, q_heads * head_dim]

    def _attend_fast(
        self, q: torch.Tensor, query_positions: torch.Tensor, pools: KvPools, layer: int, span: _Span
    ) -> torch.Tensor:
        rows, hq, d = q.shape
        group = hq // self.shape.num_kv_heads
        keys, values = pools.read(layer, span.table, span.end)
        q4 = q.permute(1, 0, 2).unsqueeze(0)
        k4 = keys.repeat_interleave(group, 0).unsqueeze(0)  # equal head counts keep flash attention eligible
        v4 = values.repeat_interleave(group, 0).unsqueeze(0)
        if rows == span.end or rows == 1:  # causal from position 0, or one query that sees every key
            out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=rows > 1)
        else:  # a chunk after a prefix: the queries are the last ``rows`` positions
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=causal_lower_right(rows, span.end))
        return out[0].permute(1, 0, 2).reshape(rows, hq * d)

    def _attend_exact(
        self, q: torch.Tensor, query_positions: torch.Tensor, pools: KvPools, layer: int, span: _Span
    ) -> torch.Tensor:
        keys, values = pools.read(layer, span.table, span.end)
        return exact.attend(q, keys, values, span.piece.start, self.shape.head_dim**-0.5, self._ops.tables)

    def _attend_tiled(
        self, q: torch.Tensor, query_positions: torch.Tensor, pools: KvPools, layer: int, span: _Span
    ) -> torch.Tensor:
        """Tiles of ``tiles[1]`` queries against all ``_key_length`` key slots (zeros past the
        piece's end), keys after each query masked: every call has the same shapes."""
        keys, values = pools.read(layer, span.table, span.end, padded_length=self._key_length)
        rows = q.shape[0]
        tile = self.tiles[1]
        padding = -rows % tile
        if padding:  # dummy queries at the last real position (their outputs are dropped)
            q = torch.cat((q, q.new_zeros((padding, *q.shape[1:]))))
            query_positions = torch.cat((query_positions, query_positions[-1:].expand(padding)))
        key_positions = torch.arange(self._key_length, device=q.device)
        out = [
            self._attention_tile(q[first : first + tile], query_positions[first : first + tile], keys, values,
                                 key_positions)
            for first in range(0, rows + padding, tile)
        ]
        return (out[0] if len(out) == 1 else torch.cat(out))[:rows]

    def _attention_tile(
        self,
        q: torch.Tensor,
        query_positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_positions: torch.Tensor,
    ) -> torch.Tensor:
        rows, hq, d = q.shape
        hkv = self.shape.num_kv_heads
        group = hq // hkv
        qg = (q * d**-0.5).permute(1, 0, 2).reshape(hkv, group * rows, d)  # q heads sharing a KV head
        scores = torch.bmm(qg, keys.transpose(1, 2))  # [hkv, group * rows, key_length]
        hidden = (key_positions[None, :] > query_positions[:, None]).repeat(group, 1)
        scores.masked_fill_(hidden, float("-inf"))
        out = torch.bmm(torch.softmax(scores, dim=-1), values)  # [hkv, group * rows, d]
        return out.reshape(hq, rows, d).permute(1, 0, 2).reshape(rows, hq * d)


class _Span:
    """Where one piece's rows lie in the batch, and its block table."""

    __slots__ = ("end", "piece", "row", "rows", "table")

    def __init__(self, piece: Piece, row: int, table: torch.Tensor):
        self.piece = piece
        self.row = row
        self.rows = len(piece.tokens)
        self.end = piece.start + self.rows  # the sequence length once this piece is written
        self.table = table


class _Batch:
    """The pieces' rows side by side, then ``padding`` dummy rows (token 0 at position 0) up to a
    multiple of the row tile."""

    def __init__(self, pieces: Sequence[Piece], device: torch.device, row_tile: int):
        tokens: list[int] = []
        positions: list[int] = []
        tables: list[int] = []
        bounds: list[tuple[int, int, int]] = []  # per piece: first row, first and end table entry
        for piece in pieces:
            bounds.append((len(tokens), len(tables), len(tables) + len(piece.block_table)))
            tokens += piece.tokens
            positions += range(piece.start, piece.start + len(piece.tokens))
            tables += piece.block_table
        self.padding = -len(tokens) % row_tile
        tokens += [0] * self.padding
        positions += [0] * self.padding
        all_tables = torch.tensor(tables, dtype=torch.long, device=device)
        self.spans = [
            _Span(piece, row, all_tables[first:end]) for piece, (row, first, end) in zip(pieces, bounds, strict=True)
        ]
        self.token_ids = torch.tensor(tokens, dtype=torch.long, device=device)
        self.positions = torch.tensor(positions, dtype=torch.long, device=device)


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
