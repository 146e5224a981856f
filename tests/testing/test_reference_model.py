"""The reference model and pool: TRT-LLM's layout, seeded weights, and the fast mode against the exact one
(the deterministic modes' invariance is in ``test_model_modes``)."""

from __future__ import annotations

import random

import pytest
import torch

from kvbm_core.errors import ConfigError
from kvbm_core.layout import BlockLayout
from kvbm_core.testing import PRESETS, KvPools, Piece, ReferenceModel, greedy_decode

TPB = 16


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


def _kv_after(model: ReferenceModel, prompt: list[int], chunks: list[int]) -> torch.Tensor:
    """Every layer's K and V of the prompt, computed chunk by chunk into a fresh pool."""
    nblocks = -(-len(prompt) // TPB)
    pools = KvPools(model.pool_geometry(nblocks, TPB), "cpu")
    pos = 0
    for n in chunks:
        model.forward([Piece(range(nblocks), pos, prompt[pos : pos + n], False)], pools)
        pos += n
    assert pos == len(prompt)
    table = torch.arange(nblocks)
    return torch.stack([torch.stack(pools.read(layer, table, len(prompt))) for layer in range(model.shape.num_layers)])


def test_weights_and_tokens_follow_the_seed() -> None:
    prompt = _prompt(40, seed=1)
    a = greedy_decode(ReferenceModel("tiny", seed=7, max_seq_len=128), prompt, 6)
    b = greedy_decode(ReferenceModel("tiny", seed=7, max_seq_len=128), prompt, 6)
    c = greedy_decode(ReferenceModel("tiny", seed=8, max_seq_len=128), prompt, 6)
    assert a == b
    assert a != c
    assert len(set(a)) > 1


def test_fast_and_batch_invariant_modes_agree_with_the_exact_mode() -> None:
    """The same model in three arithmetics: the exact mode's grids (activations in steps of 2**-12,
    softmax weights of 16 bits) keep its KV within 2e-3 of float32 here; the two float modes agree
    to rounding."""
    exact = ReferenceModel("tiny", seed=2, max_seq_len=256, mode="exact")
    fast = ReferenceModel("tiny", seed=2, max_seq_len=256, mode="fast")
    tiled = ReferenceModel("tiny", seed=2, max_seq_len=256, mode="batch_invariant")
    prompt = _prompt(90, seed=2)
    for chunks in ([90], [40, 50], [64, 1, 25]):  # from 0, after a prefix, single-token query
        fast_kv = _kv_after(fast, prompt, chunks)
        assert torch.allclose(_kv_after(exact, prompt, chunks), fast_kv, atol=1e-2)
        assert torch.allclose(_kv_after(tiled, prompt, chunks), fast_kv, atol=1e-5)


def test_pool_is_block_major_hnd_and_split_by_rank() -> None:
    model = ReferenceModel("tiny", seed=0, max_seq_len=128)
    s = model.shape
    pools = KvPools(model.pool_geometry(num_blocks=6, tokens_per_block=TPB, tp_size=2), "cpu")
    assert [tuple(t.shape) for t in pools.tensors] == [(6, s.num_layers, 2, 1 * TPB * s.head_dim)] * 2
    layout = BlockLayout.from_pool(pools.tensors[0], TPB)
    assert layout.bytes_per_block * 2 == s.kv_bytes_per_token * TPB

    table = torch.tensor([4, 1])  # position p lives in block table[p // TPB], slot p % TPB
    positions = torch.tensor([3, 17])
    k = torch.randn(2, s.num_kv_heads, s.head_dim)
    v = torch.randn(2, s.num_kv_heads, s.head_dim)
    pools.write(2, table, positions, k, v)
    for rank, tensor in enumerate(pools.tensors):
        block = tensor.view(6, s.num_layers, 2, 1, TPB, s.head_dim)  # [blocks, layers, K/V, heads, tokens, dim]
        assert torch.equal(block[4, 2, 0, 0, 3], k[0, rank])
        assert torch.equal(block[1, 2, 1, 0, 1], v[1, rank])
    keys, values = pools.read(2, table, 18)
    assert torch.equal(keys[:, 17], k[1]) and torch.equal(values[:, 3], v[0])

    pools.write(2, table, torch.tensor([20]), k[:1], v[:1])  # a later position, in the same block
    padded_keys, padded_values = pools.read(2, table, 18, padded_length=40)
    assert padded_keys.shape == (s.num_kv_heads, 40, s.head_dim)
    assert torch.equal(padded_keys[:, :18], keys) and torch.equal(padded_values[:, :18], values)
    assert not padded_keys[:, 18:].any() and not padded_values[:, 18:].any()


def test_presets_have_the_real_models_kv_bytes() -> None:
    assert PRESETS["qwen3-0.6b"].kv_bytes_per_token == 114_688
    assert PRESETS["llama-3-8b"].kv_bytes_per_token == 131_072
    with pytest.raises(ConfigError, match="unknown reference model preset"):
        ReferenceModel("gpt-5")


def test_batched_fast_path_agrees_with_one_piece_at_a_time() -> None:
    """The fast path computes a batch as one (norms, projections, MLP over every row); each piece
    still attends only over its own blocks, so KV and tokens match computing the pieces alone."""
    model = ReferenceModel("tiny", seed=4, max_seq_len=256, mode="fast")
    prompts = [_prompt(70, seed=s) for s in (1, 2, 3)]
    tables = [list(range(0, 5)), list(range(5, 10)), list(range(10, 15))]

    def run(batched: bool) -> tuple[torch.Tensor, list[int | None]]:
        pools = KvPools(model.pool_geometry(15, TPB), "cpu")
        for prompt, table in zip(prompts[1:], tables[1:]):  # prefixes already in the pool
            model.forward([Piece(table, 0, prompt[:40], False)], pools)
        pieces = [
            Piece(tables[0], 0, prompts[0], True),  # a whole prompt
            Piece(tables[1], 40, prompts[1][40:], False),  # a chunk after a prefix, no sample
            Piece(tables[2], 40, prompts[2][40:41], True),  # one token after a prefix
        ]
        if batched:
            samples = model.forward(pieces, pools)
        else:
            samples = [s for p in pieces for s in model.forward([p], pools)]
        return torch.stack(pools.tensors), [None if s is None else int(s) for s in samples]

    (kv_batched, tokens_batched), (kv_alone, tokens_alone) = run(True), run(False)
    assert tokens_batched[1] is None and tokens_batched == tokens_alone
    assert torch.allclose(kv_batched, kv_alone, atol=1e-5)
