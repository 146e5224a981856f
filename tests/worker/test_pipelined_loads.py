"""Loads copied layer by layer (CUDA with batched copies): layer l's bytes are in place once the
compute stream waited for layer l, and a forward pass that never waits gets its loads failed (and
whole-block loading from then on) instead of reading blocks before they arrived. Needs a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvbm_core.interfaces import TierContext, TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.ops import LOADS, Route, StepOps
from kvbm_core.settings.model import TierSpec
from kvbm_core.worker import TransferEngine
from kvbm_tier_cpu import PinnedHostTier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="layer-by-layer loads need CUDA")

LAYOUT = BlockLayout(num_layers=8, kv_factor=2, elems_per_block=32 * 8 * 128, dtype="bfloat16", tokens_per_block=32)


def rig(blocks: int = 64):
    context = TierContext(spec=TierSpec(kind="cpu", num_blocks=blocks), layout=LAYOUT, num_slots=blocks, rank=0,
                          world_size=1, namespace=b"\x42" * 16)
    host = PinnedHostTier(context)
    host.slots.copy_(torch.randint(0, 256, host.slots.shape, dtype=torch.uint8))
    pool = torch.zeros(blocks, LAYOUT.num_layers, 2, LAYOUT.elems_per_block, dtype=torch.bfloat16, device="cuda")
    engine = TransferEngine(pool, LAYOUT, {TierLevel.HOST: host}, rank=0)
    return engine, host, pool.view(blocks, -1).view(torch.uint8)


def load(engine, request_id: int, src: np.ndarray, dst: np.ndarray, stream) -> dict:
    ops = StepOps.build(request_id, [(request_id, Route.H2D, request_id, src, dst, np.zeros((len(src), 2), np.uint64))])
    return engine.start_loads(ops.select(LOADS), stream)


def test_each_layer_is_in_place_once_waited_for():
    engine, host, pool = rig()
    assert engine.pipelined
    stream = torch.cuda.current_stream()
    src, dst = np.random.default_rng(0).permutation(64)[:48], np.arange(48)
    assert not load(engine, 1, src, dst, stream)
    layer_bytes = pool.shape[1] // LAYOUT.num_layers
    expected = host.slots[torch.from_numpy(src)].cuda()
    for layer in range(LAYOUT.num_layers):
        engine.wait_layer(layer, stream)
        part = slice(layer * layer_bytes, (layer + 1) * layer_bytes)
        assert torch.equal(pool[:48, part], expected[:, part]), layer  # read on the compute stream
    assert engine.end_forward(stream) == []
    assert engine.pipelined
    engine.close()
    host.close()


def test_a_forward_pass_without_layer_waits_fails_its_loads_and_stops_pipelining():
    engine, host, pool = rig()
    stream = torch.cuda.current_stream()
    assert not load(engine, 7, np.arange(8), np.arange(8), stream)
    assert engine.end_forward(stream) == [7]
    assert not engine.pipelined
    assert not load(engine, 8, np.arange(8, 16), np.arange(8, 16), stream)  # whole blocks, before the forward
    torch.cuda.synchronize()
    assert torch.equal(pool[8:16].cpu(), host.slots[8:16])
    assert engine.end_forward(stream) == []
    engine.close()
    host.close()
