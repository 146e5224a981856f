"""The reference model's deterministic modes: a token's KV bytes and greedy tokens do not depend on
how its prompt was chunked, what it was batched with, or whether its prefix was loaded; and the
exact mode stays a real model (KV depends on the whole prefix, a wrong KV byte changes the output)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from functools import cache

import pytest
import torch

from kvbm_core.errors import ConfigError
from kvbm_core.testing import ExecutorConfig, KvPools, Piece, ReferenceExecutor, ReferenceModel, RequestSpec, exact
from kvbm_core.testing.model import default_mode

from .recording_connector import Options, make_connector

TPB = 16
DETERMINISTIC = ["exact", "batch_invariant"]


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


@cache
def _model(mode: str) -> ReferenceModel:
    return ReferenceModel("tiny", seed=5, max_seq_len=256, mode=mode)


@dataclass
class Request:
    """One request's blocks in a shared pool and its prompt, served chunk by chunk then decoded."""

    table: list[int]
    prompt: list[int]
    chunks: list[int]
    decode: int = 3
    position: int = 0  # tokens computed so far
    tokens: list[int] = field(default_factory=list)  # generated so far

    def next_piece(self) -> Piece | None:
        if self.position < len(self.prompt):
            n = self.chunks.pop(0)
            piece = Piece(self.table, self.position, self.prompt[self.position : self.position + n],
                          self.position + n == len(self.prompt))
        elif self.tokens and len(self.tokens) < self.decode:
            piece = Piece(self.table, self.position, self.tokens[-1:], True)
        else:
            return None
        self.position += len(piece.tokens)
        return piece

def _serve(model: ReferenceModel, pools: KvPools, requests: list[Request]) -> None:
    """Forward passes over every request's next piece together until all are done."""
    while True:
        batch = [(r, p) for r in requests if (p := r.next_piece()) is not None]
        if not batch:
            return
        for (request, _), token in zip(batch, model.forward([p for _, p in batch], pools), strict=True):
            if token is not None:
                request.tokens.append(int(token))


def _kv(model: ReferenceModel, pools: KvPools, request: Request) -> torch.Tensor:
    """Every layer's K and V of the request's positions so far, read from the pool."""
    table = torch.tensor(request.table)
    return torch.stack([torch.stack(pools.read(layer, table, request.position))
                        for layer in range(model.shape.num_layers)])


def _alone(model: ReferenceModel, prompt: list[int], chunks: list[int]) -> tuple[torch.Tensor, list[int]]:
    nblocks = -(-(len(prompt) + 3) // TPB)
    pools = KvPools(model.pool_geometry(nblocks, TPB), model.device)
    request = Request(list(range(nblocks)), prompt, list(chunks))
    _serve(model, pools, [request])
    return _kv(model, pools, request), request.tokens


@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_kv_bytes_and_tokens_do_not_depend_on_chunking(mode: str) -> None:
    model = _model(mode)
    prompt = _prompt(100)
    kv, tokens = _alone(model, prompt, [100])
    for chunks in ([32, 32, 36], [48, 5, 47], [1] * 100):
        chunked_kv, chunked_tokens = _alone(model, prompt, chunks)
        assert torch.equal(chunked_kv, kv), chunks
        assert chunked_tokens == tokens, chunks


@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_kv_bytes_and_tokens_do_not_depend_on_the_batch(mode: str) -> None:
    """The same request served beside others (their prefill chunks and decode steps in the same
    forward passes, its rows at other offsets) as alone."""
    model = _model(mode)
    prompt = _prompt(90, seed=1)
    kv, tokens = _alone(model, prompt, [90])
    pools = KvPools(model.pool_geometry(24, TPB), model.device)
    target = Request(list(range(16, 22)), prompt, [20, 1, 40, 29])
    others = [
        Request(list(range(0, 8)), _prompt(120, seed=2), [7, 50, 63]),
        Request(list(range(8, 11)), _prompt(30, seed=3), [30], decode=8),
    ]
    _serve(model, pools, [others[0], target, others[1]])
    assert torch.equal(_kv(model, pools, target), kv)
    assert target.tokens == tokens


@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_kv_bytes_and_tokens_do_not_depend_on_where_the_prefix_came_from(mode: str) -> None:
    """A prefix's blocks copied into other blocks of another pool, as a connector onboards them,
    then the rest computed in chunks: the same bytes and tokens as computing the whole prompt."""
    model = _model(mode)
    prompt = _prompt(90, seed=4)
    source = KvPools(model.pool_geometry(8, TPB), model.device)
    whole = Request(list(range(8)), prompt, [90])
    _serve(model, source, [whole])
    pools = KvPools(model.pool_geometry(16, TPB), model.device)
    table = [11, 3, 14, 7, 0, 9, 5]
    pools.tensors[0][table[:4]] = source.tensors[0][:4]  # 64 tokens, every layer
    rest = Request(table, prompt, [10, 1, 15], position=64)
    _serve(model, pools, [rest])
    assert torch.equal(_kv(model, pools, rest), _kv(model, source, whole))
    assert rest.tokens == whole.tokens


@pytest.mark.parametrize("kind", [0, 1], ids=["K", "V"])
def test_exact_mode_a_wrong_kv_byte_in_the_prefix_changes_the_tokens(kind: int) -> None:
    model = _model("exact")
    prompt = _prompt(60, seed=6)

    def tokens_after(flip: bool) -> list[int]:
        pools = KvPools(model.pool_geometry(4, TPB), model.device)
        model.forward([Piece(range(4), 0, prompt[:48], False)], pools)
        if flip:  # one byte of one value in block 0 (positions 0-15), layer 0
            block = pools.tensors[0][0, 0, kind]
            index = int(torch.nonzero((block.abs() >= 0.5) & (block.abs() < 1))[0])
            block.view(torch.uint8)[4 * index + 3] ^= 0x40  # the exponent's top bit: 2**128 times larger
            assert abs(float(block[index])) > 1e30
        request = Request(list(range(4)), prompt, [12], position=48)
        _serve(model, pools, [request])
        return request.tokens

    assert tokens_after(True) != tokens_after(False)


def test_exact_mode_kv_depends_on_the_whole_prefix() -> None:
    model = _model("exact")
    prompt = _prompt(40, seed=7)
    changed = [(prompt[0] + 1) % 512, *prompt[1:]]  # only the first token differs
    kv, _ = _alone(model, prompt, [40])
    other, _ = _alone(model, changed, [40])
    last = 39  # the last prompt position: layer 0 sees only its own token, every later layer all of them
    assert torch.equal(kv[0, :, :, last], other[0, :, :, last])
    for layer in range(1, model.shape.num_layers):
        assert not torch.equal(kv[layer, :, :, last], other[layer, :, :, last]), layer


def test_batch_invariant_tiles_wider_than_a_row_compute_the_same_model() -> None:
    """Tiles of several rows and queries (padded with dummy rows) agree with one-row tiles."""
    prompt = _prompt(45, seed=9)
    kv, _ = _alone(_model("batch_invariant"), prompt, [30, 15])
    wide = ReferenceModel("tiny", seed=5, max_seq_len=256, mode="batch_invariant", tiles=(8, 4))
    wide_kv, _ = _alone(wide, prompt, [30, 15])
    assert torch.allclose(wide_kv[:, :, :, :45], kv[:, :, :, :45], atol=1e-5)  # the prompt's positions


def test_batch_invariant_executor_onboards_bit_exact_kv() -> None:
    """End to end in the batch-invariant mode: a connector's onboarded blocks pass the bit-exact
    oracle and the tokens equal a run without the connector, scheduled in other chunks."""
    cfg = ExecutorConfig(tokens_per_block=TPB, num_blocks=48, max_seq_len=256, max_batch_size=4, oracle=True,
                         model_mode="batch_invariant", enable_chunked_prefill=True, max_num_tokens=32)
    prefix = _prompt(64, seed=10)
    scheduler, worker, _ = make_connector(Options())
    before = ReferenceExecutor(cfg, connector=(scheduler, worker))
    before.run([RequestSpec(prefix + _prompt(5, seed=11), 3), RequestSpec(_prompt(40, seed=12), 3)])
    second = [RequestSpec(prefix + _prompt(20, seed=13), 4), RequestSpec(prefix[:32] + _prompt(9, seed=14), 3)]
    baseline = ReferenceExecutor(replace(cfg, max_num_tokens=48), model=before.model).run(second)
    result = ReferenceExecutor(cfg, connector=(scheduler, worker), model=before.model).run(second)
    assert result.requests[0].connector_tokens == 64
    assert result.counters.oracle_checked_tokens >= 64
    assert result.tokens() == baseline.tokens()


def test_modes_default_by_device_and_bad_values_are_refused() -> None:
    assert (default_mode("cpu"), default_mode("cuda")) == ("exact", "fast")
    assert ReferenceModel("tiny", max_seq_len=64).mode == "exact"
    with pytest.raises(ConfigError, match="model_mode: unknown reference model mode 'invariant'"):
        ReferenceModel("tiny", mode="invariant")
    with pytest.raises(ConfigError, match="model_mode: unknown reference model mode 'slow'"):
        ReferenceExecutor(ExecutorConfig(model_mode="slow"))
    with pytest.raises(ConfigError, match="tiles: only the batch_invariant mode uses tiles"):
        ReferenceModel("tiny", mode="exact", tiles=(2, 2))
    with pytest.raises(ConfigError, match="max_seq_len: 131073 is above 131072"):
        ReferenceModel("tiny", mode="exact", max_seq_len=2**17 + 1)


def test_exact_matmul_sums_stay_exact_at_the_grid_bounds() -> None:
    """Activations and weights at the ends of their grids: the float64 product equals the integer one."""
    k = 14336  # Llama-3-8B's longest sum (the MLP's down projection)
    x = exact.activations(torch.full((2, k), 300.0))  # clamped to 2**8, then one unit less on odd columns
    x[:, 1::2] -= 2.0**-exact.ACT_BITS
    x[1] *= -1
    w = exact.weights(torch.full((k, 3), 5.0))  # clamped to the largest weight that keeps x @ w exact
    w[:, 1] -= 2.0**-exact.WEIGHT_BITS
    units = (x * 2**exact.ACT_BITS).long() @ (w * 2**exact.WEIGHT_BITS).long()
    assert int(units.abs().max()) > 2**52
    assert torch.equal(x @ w, units.double() * 2.0 ** -(exact.ACT_BITS + exact.WEIGHT_BITS))


def test_exact_attention_does_not_depend_on_how_queries_are_sliced() -> None:
    """Each query alone against only the keys it sees, or all together against every key: equal bytes."""
    tables = exact.Tables(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    q = exact.activations(torch.randn(37, 4, 16, generator=gen))
    keys, values = torch.randn(2, 50, 16, generator=gen), torch.randn(2, 50, 16, generator=gen)
    together = exact.attend(q, keys, values, 13, 0.25, tables)
    assert torch.equal(exact.attend(q, keys, values, 13, 0.25, tables, rows_per_slice=1), together)
