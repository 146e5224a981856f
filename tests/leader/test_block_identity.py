"""Block identity: BlockKey (ours, 128-bit prefix chain) and DynamoSequenceHash (KV events)."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_core.identity import (
    KEY_FORMAT,
    PROCESS_NONCE,
    DynamoSequenceChain,
    Namespace,
    PrefixHasher,
    RequestScope,
    block_keys,
    dynamo_salt_hash,
    dynamo_sequence_hashes,
    token_array,
)
from kvbm_core.layout import BlockLayout

NS = Namespace.from_layout(BlockLayout(4, 2, 256, "bfloat16", 4), "org/model", world_size=2)


def reference_keys(namespace: Namespace, tokens: list[int], scope: RequestScope) -> list[tuple[int, int]]:
    """The documented chain, one block at a time."""
    fields = {k: v for k, v in (("salt", scope.cache_salt), ("salt_id", scope.cache_salt_id),
                                ("lora", scope.lora_task_id)) if v is not None}
    if scope.lora_task_id is not None:
        fields["process"] = PROCESS_NONCE
    tag = b"\x00" if not fields else b"\x02" + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    key = xxhash.xxh3_128_digest(KEY_FORMAT + namespace.digest + tag)
    tpb = namespace.tokens_per_block
    out = []
    for i in range(len(tokens) // tpb):
        key = xxhash.xxh3_128_digest(key + struct.pack(f"<{tpb}I", *tokens[i * tpb : (i + 1) * tpb]))
        out.append(struct.unpack("<QQ", key))
    return out


def test_keys_follow_the_documented_chain():
    rng = np.random.default_rng(0)
    for scope in (RequestScope(), RequestScope("tenant-a"), RequestScope(cache_salt_id=7, lora_task_id=3)):
        tokens = rng.integers(0, 200_000, 4 * 40 + 3).tolist()
        keys = block_keys(NS, tokens, scope)
        assert keys.dtype == np.uint64 and keys.shape == (40, 2)
        assert [tuple(k) for k in keys.tolist()] == reference_keys(NS, tokens, scope)


def test_every_part_of_the_scope_separates_keys():
    tokens = list(range(4 * 5))
    scopes = [RequestScope(), RequestScope("7"), RequestScope(cache_salt_id=7), RequestScope(lora_task_id=7),
              RequestScope("7", lora_task_id=7), RequestScope(cache_salt_id=7, lora_task_id=7)]
    firsts = {tuple(block_keys(NS, tokens, scope)[0]) for scope in scopes}
    assert len(firsts) == len(scopes)


def test_key_format_is_stable_across_releases():
    # Disk tiers keep blocks across restarts: a change here orphans every stored block. Update the
    # expected values only together with KEY_FORMAT / NAMESPACE_FORMAT.
    ns = Namespace.from_layout(BlockLayout(2, 2, 64, "float16", 4), "m", world_size=1,
                               weights="0123456789abcdef0123456789abcdef")
    keys = block_keys(ns, list(range(12)))
    assert ns.digest.hex() == GOLDEN_NAMESPACE
    assert [f"{a:016x}{b:016x}" for a, b in keys.tolist()] == GOLDEN_KEYS


GOLDEN_NAMESPACE = "4d1458ba9ba373d178c34f52e3ef1b80"
GOLDEN_KEYS = ["370b3d6b1a5cd3b23ddc958812ee20d9", "194f3a820943cd0622efd905a8db8f6b", "ee23597fa77a7b7d7ab6b671fc09989f"]


def test_a_key_covers_the_whole_prefix():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 50_000, 4 * 30).tolist()
    base = block_keys(NS, tokens)
    assert len({tuple(k) for k in base.tolist()}) == 30
    changed = list(tokens)
    changed[4 * 12 + 2] += 1  # one token of block 12
    other = block_keys(NS, changed)
    assert np.array_equal(other[:12], base[:12])
    assert not (other[12:] == base[12:]).all(axis=1).any()
    # a prefix of the prompt has the prompt's first keys
    assert np.array_equal(block_keys(NS, tokens[: 4 * 7 + 1]), base[:7])


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": "org/other"},
        {"dtype": "float16"},
        {"num_layers": 5},
        {"kv_factor": 1},
        {"elems_per_block": 512},
        {"world_size": 4, "tp_size": 4},
        {"tp_size": 1},
        {"rank_layout": "replicated"},
    ],
)
def test_namespace_fields_change_every_key(change):
    tokens = list(range(100, 140))
    other = dataclasses.replace(NS, **change)
    assert other.digest != NS.digest and len(other.digest) == 16
    a, b = block_keys(NS, tokens), block_keys(other, tokens)
    assert not (a == b).all(axis=1).any()


def test_tokens_per_block_and_salt_change_every_key():
    tokens = list(range(64))
    ns8 = dataclasses.replace(NS, tokens_per_block=8)
    a = {tuple(k) for k in block_keys(NS, tokens).tolist()}
    assert not a & {tuple(k) for k in block_keys(ns8, tokens).tolist()}
    for salt in ("", "x"):
        assert not a & {tuple(k) for k in block_keys(NS, tokens, RequestScope(salt)).tolist()}
    empty, x = block_keys(NS, tokens, RequestScope("")), block_keys(NS, tokens, RequestScope("x"))
    assert not (empty == x).all(axis=1).any()


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.integers(0, 2**32 - 1), max_size=90), cuts=st.lists(st.integers(1, 23), max_size=12),
       hash_every=st.booleans())
def test_incremental_hashing_equals_one_shot(tokens, cuts, hash_every):
    hasher = PrefixHasher(NS.key_space(RequestScope("s")))
    pos = 0
    for cut in [*cuts, len(tokens)]:
        hasher.append(tokens[pos : pos + cut])
        pos += cut
        if hash_every:
            hasher.keys(hasher.num_full_blocks)
    hasher.append(tokens[pos:])
    assert np.array_equal(hasher.keys(hasher.num_full_blocks), block_keys(NS, tokens, RequestScope("s")))


def test_numpy_and_list_tokens_agree_and_bad_tokens_raise():
    tokens = list(range(2**32 - 20, 2**32))
    assert np.array_equal(block_keys(NS, np.array(tokens, np.int64)), block_keys(NS, tokens))
    with pytest.raises(OverflowError):
        token_array([1, -1])
    with pytest.raises(OverflowError):
        token_array(np.array([2**32], np.int64))
    with pytest.raises(ValueError, match="not full"):
        PrefixHasher(NS.key_space(), [1, 2, 3, 4]).keys(2)


def test_dynamo_sequence_hash_is_the_routers_documented_chain():
    """Dynamo's KV router: XXH3-64 seed 1337 over each block's u32 LE tokens, chained as
    XXH3-64(parent u64 LE || local u64 LE, seed 1337); its published test vector included."""
    assert dynamo_salt_hash() == 1337
    assert dynamo_sequence_hashes([1, 2, 3, 4], 4).tolist() == [14643705804678351452]
    tokens = list(range(1000, 1000 + 3 * 32 + 5))
    expected = []
    parent = None
    for i in range(3):
        block = b"".join(t.to_bytes(4, "little") for t in tokens[i * 32 : (i + 1) * 32])
        local = xxhash.xxh3_64_intdigest(block, seed=1337)
        parent = local if parent is None else xxhash.xxh3_64_intdigest(
            parent.to_bytes(8, "little") + local.to_bytes(8, "little"), seed=1337)
        expected.append(parent)
    assert dynamo_sequence_hashes(tokens, 32).tolist() == expected


def test_dynamo_seed_adds_lora_name_and_salt_hashes():
    lora = xxhash.xxh3_64_intdigest(b"lora1", seed=0)
    salt = xxhash.xxh3_64_intdigest("\u00e9".encode(), seed=1)
    assert dynamo_salt_hash(None, "lora1") == (1337 + lora) % 2**64
    assert dynamo_salt_hash("\u00e9") == (1337 + salt) % 2**64
    assert dynamo_salt_hash("\u00e9", "lora1") == (1337 + lora + salt) % 2**64
    assert dynamo_salt_hash("", "") == 1337  # empty strings count as absent, as in the router
    assert dynamo_sequence_hashes([1, 2, 3, 4], 4, "s").tolist() != [14643705804678351452]


def test_dynamo_chain_extends_lazily():
    tokens = token_array(list(range(4 * 10)))
    chain = DynamoSequenceChain(dynamo_salt_hash(), 4)
    first = chain.upto(tokens, 3)
    rest = chain.upto(tokens, 10)
    assert np.array_equal(rest[:3], first)
    assert np.array_equal(rest, dynamo_sequence_hashes(list(range(40)), 4))


def test_hashes_are_the_same_in_a_fresh_process_with_another_hash_seed():
    script = textwrap.dedent(
        """
        import json, sys
        from kvbm_core.identity import Namespace, RequestScope, block_keys, dynamo_sequence_hashes
        from kvbm_core.layout import BlockLayout
        ns = Namespace.from_layout(BlockLayout(4, 2, 256, "bfloat16", 4), "org/model", world_size=2)
        tokens = [(i * 7919) % 151_000 for i in range(203)]
        print(json.dumps({
            "ns": ns.digest.hex(),
            "keys": block_keys(ns, tokens, RequestScope("salt")).tolist(),
            "dyn": dynamo_sequence_hashes(tokens, 4, "salt").tolist(),
        }))
        """
    )
    tokens = [(i * 7919) % 151_000 for i in range(203)]
    here = {"ns": NS.digest.hex(), "keys": block_keys(NS, tokens, RequestScope("salt")).tolist(),
            "dyn": dynamo_sequence_hashes(tokens, 4, "salt").tolist()}
    for seed in ("0", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == here, seed


def test_lora_keys_and_unfound_weights_are_bound_to_the_process():
    """A LoRA task id names an adapter only inside one process, and weights not on this machine
    cannot be vouched for: such keys never match in another process (a restarted engine)."""
    script = textwrap.dedent(
        """
        import json
        from kvbm_core.fingerprint import fingerprint_weights
        from kvbm_core.identity import Namespace, RequestScope, block_keys
        from kvbm_core.layout import BlockLayout
        ns = Namespace.from_layout(BlockLayout(4, 2, 256, "bfloat16", 4), "org/model", world_size=2)
        tokens = list(range(16))
        print(json.dumps({"plain": block_keys(ns, tokens).tolist(),
                          "lora": block_keys(ns, tokens, RequestScope(lora_task_id=3)).tolist(),
                          "missing": fingerprint_weights("no-such-org/no-such-model").digest}))
        """
    )
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                      check=True).stdout) for _ in range(2)]
    assert runs[0]["plain"] == runs[1]["plain"] == block_keys(NS, list(range(16))).tolist()
    assert runs[0]["lora"] != runs[1]["lora"]
    assert runs[0]["missing"] != runs[1]["missing"]
    lora = RequestScope(lora_task_id=3)
    assert block_keys(NS, list(range(16)), lora).tolist() == block_keys(NS, list(range(16)), lora).tolist()
