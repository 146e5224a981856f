"""Arithmetic of the reference model's ``exact`` mode: results that no kernel, blocking or CPU can change.

Why a token's KV and logits cannot depend on how its prompt was chunked, what it was batched with,
or whether its prefix was computed or loaded (on any x86-64 CPU, and on a GPU):

1. **Grids.** Every value that enters a sum lies on a fixed-point grid, held in float64:
   activations are multiples of 2^-12 clamped to [-2^8, 2^8] (integers of at most 2^20 units);
   a weight matrix with ``K`` rows holds multiples of 2^-20 clamped to [-2^13/K, 2^13/K]; softmax
   weights are integers in [0, 2^16]. Rounding to a grid (multiply by a power of two, round half
   to even, multiply back) and clamping are exact operations.
2. **Sums are exact.** A product of two grid values is an integer number of grid units; every
   partial sum of ``K`` such products, in any order and grouping, has magnitude at most the sum of
   the magnitudes, which the bounds keep at or below 2^53 units, so float64 represents it exactly.
   An IEEE-754 add or fused multiply-add whose exact result is representable returns it unrounded.
   Hence every float64 matmul here (QKV, O, MLP, LM head, q·k, weights·V) and every sum (a norm's
   sum of squares, the softmax denominator) returns the exact sum, whatever the BLAS, its blocking,
   its SIMD width, its thread count or the number of rows in the call. The bounds, in units:
   x @ w: K·2^20·(2^33/K) = 2^53; q·k: head_dim·2^40 <= 2^53 for head_dim <= 2^13; sum of squares:
   hidden·2^40 <= 2^53 for hidden <= 2^13; weights·V: L·2^16·2^20 <= 2^53 for L <= 2^17 keys.
   :func:`check_shape` refuses shapes beyond them.
3. **Everything else is elementwise and correctly rounded, or exact.** Between the sums the model
   uses only +, -, *, / and sqrt (IEEE-754 requires each to return the correctly rounded result,
   so it depends on its operands alone, not on a SIMD lane, a vector width or a scalar tail loop),
   each as its own tensor operation (no fused multiply-add across operations), plus exact
   operations: rounding to a grid, clamps, max, comparisons and table lookups.
4. **No transcendental function is evaluated in a pass.** exp (softmax) and SiLU are looked up in
   tables at grid points; the tables, and RoPE's cos/sin per position, are computed once when the
   model is built, so a value never depends on where its element sits in a tensor.
5. **Attention reads the pool.** A row's keys and values are read back from the KV pool (its own
   too, after writing them) and put on the grid, so the same bytes give the same result whether
   they were computed in this pass, an earlier one, or loaded by a connector; keys after the
   row's position get softmax weight 0, exactly.

So a row's result is a function of its token, its position and the pool bytes at positions up to
its own: equal inputs give equal bytes, and the proof needs nothing of the hardware beyond IEEE-754
float64. The price is precision (activations carry 12 fractional bits, softmax weights 16 bits)
and float64 speed, which is fine for the tiny model the tests run.
"""

from __future__ import annotations

import torch

from kvbm_core.errors import ConfigError

ACT_BITS = 12  # activations: multiples of 2**-12 ...
ACT_LIMIT = 2.0**8  # ... within +-2**8, so at most 2**20 units
WEIGHT_BITS = 20  # weights: multiples of 2**-20
EXP_BITS = 10  # softmax: exp is tabulated at multiples of 2**-10 ...
PROB_BITS = 16  # ... as integers round(2**16 * exp(-x))
SILU_BITS = 10  # SiLU: tabulated at multiples of 2**-10 ...
SILU_LIMIT = 16.0  # ... within +-16; beyond, SiLU(x) is max(x, 0) to within 2e-6
MAX_SUM_DIM = 2**13  # the longest sum of squared activations or q·k products (see the bounds above)
MAX_KEYS = 2**17  # the most keys a weights·V sum may span


def check_shape(hidden_size: int, head_dim: int, max_seq_len: int) -> None:
    """Refuse a shape whose sums could exceed 2^53 grid units (module docstring, point 2)."""
    for name, value, limit in (
        ("hidden_size", hidden_size, MAX_SUM_DIM),
        ("head_dim", head_dim, MAX_SUM_DIM),
        ("max_seq_len", max_seq_len, MAX_KEYS),
    ):
        if value > limit:
            raise ConfigError(name, f"{value} is above {limit}, where the exact model mode's sums stay exact")


def to_grid(x: torch.Tensor, bits: int, limit: float) -> torch.Tensor:
    """``x`` in float64, clamped to +-``limit`` and rounded to a multiple of 2**-``bits``."""
    scale = 2.0**bits
    return x.to(torch.float64).clamp(-limit, limit).mul_(scale).round_().mul_(1.0 / scale)


def activations(x: torch.Tensor) -> torch.Tensor:
    return to_grid(x, ACT_BITS, ACT_LIMIT)


def pool_values(x: torch.Tensor) -> torch.Tensor:
    """Keys or values read from the pool, on the activation grid (bytes a connector corrupted
    included: NaN becomes 0, infinities the grid's ends)."""
    return activations(torch.nan_to_num(x.to(torch.float64), nan=0.0))


def weights(w: torch.Tensor) -> torch.Tensor:
    """A weight matrix ``[K, N]`` on its grid, clamped so that ``activations @ w`` stays exact."""
    activation_units = ACT_LIMIT * 2**ACT_BITS  # 2**20
    limit_units = 2**53 // (w.shape[0] * int(activation_units))  # K * 2**20 * limit_units <= 2**53
    return to_grid(w, WEIGHT_BITS, limit_units / 2**WEIGHT_BITS)


class Tables:
    """The exp and SiLU tables, computed once per model on its device."""

    def __init__(self, device: torch.device):
        steps = torch.arange(0, 13 * 2**EXP_BITS, dtype=torch.float64)
        exp = torch.round(torch.exp(-steps / 2**EXP_BITS) * 2**PROB_BITS)
        last = int(torch.nonzero(exp == 0)[0])  # the first weight that rounds to 0 ends the table
        self.exp = exp[: last + 1].to(device)  # exp[i] = round(2**16 * exp(-i / 2**10)); exp[-1] == 0
        points = torch.arange(-SILU_LIMIT * 2**SILU_BITS, SILU_LIMIT * 2**SILU_BITS + 1, dtype=torch.float64)
        points = points / 2**SILU_BITS
        self.silu = (points * torch.sigmoid(points)).to(device)  # silu[i] = SiLU(i / 2**10 - 16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: an exact sum of squares, then correctly rounded steps."""
    x = activations(x)
    mean_square = (x * x).sum(-1, keepdim=True) * (1.0 / x.shape[-1])  # exact for a power-of-two size
    return activations(x / torch.sqrt(mean_square + eps) * weight)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``[rows, heads, head_dim]`` by per-row ``cos``/``sin`` ``[rows, 1, head_dim / 2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return activations(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def silu_mul(gate: torch.Tensor, up: torch.Tensor, tables: Tables) -> torch.Tensor:
    """SiLU(gate) * up, with SiLU looked up at gate's nearest multiple of 2**-10."""
    index = (gate.clamp(-SILU_LIMIT, SILU_LIMIT) + SILU_LIMIT).mul_(2**SILU_BITS).round_().int()
    silu = torch.where(gate.abs() <= SILU_LIMIT, tables.silu.index_select(0, index.view(-1)).view(gate.shape),
                       gate.clamp(min=0))
    return activations(silu * up)


def residual(h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``h + delta`` for ``h`` on the grid: exact, then clamped."""
    return (h + activations(delta)).clamp_(-ACT_LIMIT, ACT_LIMIT)


def attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    scale: float,
    tables: Tables,
    rows_per_slice: int = 128,
) -> torch.Tensor:
    """Causal attention of the queries ``[rows, q_heads, d]`` (on the grid) of positions ``start,
    start + 1, ...`` over the pool's keys and values ``[kv_heads, start + rows, d]``; returns
    ``[rows, q_heads * d]``.

    Softmax weights are table integers, ``exp[round((max - score) * scale * 2**10)]``; the output
    is the exact weighted sum of values over the exact sum of weights, one division. Queries go in
    slices of ``rows_per_slice``, each against the keys up to its last position only (a hidden
    key's weight is 0 and every sum is exact, so a query's result is the same in any slice).
    """
    rows, hq, d = q.shape
    hkv = keys.shape[0]
    group = hq // hkv
    keys, values = pool_values(keys), pool_values(values)
    to_steps = scale * 2**EXP_BITS
    outputs = []
    for first in range(0, rows, rows_per_slice):
        n = min(rows_per_slice, rows - first)
        seen = start + first  # keys every query of the slice sees
        length = seen + n  # keys up to the slice's last query
        qg = q[first : first + n].permute(1, 0, 2).reshape(hkv, group * n, d)  # q heads sharing a KV head
        scores = torch.bmm(qg, keys[:, :length].transpose(1, 2))
        own = torch.arange(n, device=q.device)
        hidden = (own[None, :] > own[:, None]).repeat(group, 1)  # among the slice's own positions
        scores[:, :, seen:].masked_fill_(hidden, float("-inf"))
        top = scores.amax(-1, keepdim=True)
        steps = scores.sub_(top).mul_(-to_steps).round_().clamp_(max=len(tables.exp) - 1)  # (top - s) * c
        weights = tables.exp.index_select(0, steps.int().view(-1)).view(steps.shape)  # hidden: +inf steps -> 0
        out = torch.bmm(weights, values[:, :length]) / weights.sum(-1, keepdim=True)  # [hkv, group * n, d]
        outputs.append(out.reshape(hq, n, d).permute(1, 0, 2).reshape(n, hq * d))
    return activations(torch.cat(outputs) if len(outputs) > 1 else outputs[0])
