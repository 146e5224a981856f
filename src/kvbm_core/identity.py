"""Block identity: which KV bytes a full block holds, as keys that survive processes and restarts.

Two hashes live here and are kept apart on purpose:

**BlockKey** (ours, 128 bits) is what the leader registers, matches and stamps on disk. Block ``i``
of a request covers tokens ``[i*tpb, (i+1)*tpb)``; its bytes depend on every token before it and on
everything in :class:`Namespace` (model, KV dtype, layout, tokens per block, TP size and how ranks
split a block) plus the request's cache salt. The key is a chained hash of the whole prefix::

    root      = XXH3-128(FORMAT || namespace digest || salt tag)        (16 bytes -> two u64 lanes)
    d_i       = XXH3-128(tokens of block i as u32 LE, seed = root lane 0)  (two u64 lanes)
    acc_{-1}  = root lanes
    acc_i     = R * acc_{i-1} + d_i        per lane, mod 2**64 (R odd, one constant per lane)
    key_i     = fmix64(acc_i XOR (i+1) * P)   per lane (murmur3's finalizer; P odd, one per lane)

``acc_i`` depends on every block up to ``i`` in order (a Horner chain over per-block XXH3 digests).
Unlike ``H(parent || block)`` the recurrence is linear, so a whole prompt is keyed with one batched
call per block (``map`` over XXH3, no Python frame per block) and a numpy cumulative sum: a
20k-token prompt costs well under the per-token cost of converting its Python list. For two
different prefixes the lanes collide with probability about 2**-64 each when the block digests
behave as random, as with any 128-bit non-cryptographic chain; like XXH3 itself the key is not
meant to resist a crafted collision (tenants are separated by the cache salt). Never Python's
``hash()``: everything is fixed bytes in, fixed integers out, independent of ``PYTHONHASHSEED``.
Keys travel as ``[n, 2]`` uint64 arrays (see :class:`kvbm_core.ops.StepOps`).

**DynamoSequenceHash** (Dynamo KVBM's, 64 bits) is only for KV events, so that consumers of
Dynamo's events see the numbers they expect::

    salt_hash  = XXH3-64(json {"salt":..., "lora_name":...} without None fields, seed 0)   ("{}" when both are None)
    block_hash = XXH3-64(tokens of the block as u32 LE, seed = salt_hash)
    seq_0      = block_hash_0;   seq_i = XXH3-64(seq_{i-1} u64 LE || block_hash_i u64 LE, seed = salt_hash)

TRT-LLM passes neither salt nor LoRA name to Dynamo, so its events hash ``"{}"``; when a request
carries a cache salt we mix it in as Dynamo's vLLM path does.

Both are computed incrementally per request (:class:`PrefixHasher`, :class:`DynamoSequenceChain`):
a prompt is hashed once and later steps only hash the blocks that became full.
"""

from __future__ import annotations

import json
import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat

import numpy as np
import xxhash

from kvbm_core.layout import BlockLayout

KEY_FORMAT = b"kvbm-block-key/1\x00"
NAMESPACE_FORMAT = "kvbm-namespace/1"

_MASK = (1 << 64) - 1
# Odd multipliers of the two Horner lanes and of the position binding (odd = invertible mod 2**64).
_R = (0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93)
_POS = (0xA0761D6478BD642F, 0xE7037ED1A0B428DB)
_FMIX = (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53)
_R_ARRAY = np.array(_R, np.uint64)
_POS_ARRAY = np.array(_POS, np.uint64)
# Segments of up to this many blocks are chained with Python integers (cheaper than numpy set-up).
_SCALAR_SEGMENT = 4

_TOKEN_CODE = next(c for c in "IL" if array(c).itemsize == 4)
_LITTLE = sys.byteorder == "little"


def token_array(tokens: Sequence[int] | np.ndarray) -> array:
    """Tokens as a compact u32 array; a token outside ``[0, 2**32)`` raises :class:`OverflowError`."""
    if isinstance(tokens, np.ndarray):
        if tokens.size and (tokens.min() < 0 or tokens.max() > 0xFFFFFFFF):
            raise OverflowError("token ids must lie in [0, 2**32)")
        out = array(_TOKEN_CODE)
        out.frombytes(np.ascontiguousarray(tokens, dtype=np.uint32).tobytes())
        return out
    return array(_TOKEN_CODE, tokens)


def _block_bytes(tokens: array, tokens_per_block: int, start: int, stop: int) -> list[bytes]:
    """Blocks ``[start, stop)`` of ``tokens`` as little-endian u32 bytes, one object per block."""
    if stop <= start:
        return []
    if stop - start <= _SCALAR_SEGMENT and _LITTLE:  # a block or two (decode): slicing is cheaper
        return [tokens[i * tokens_per_block : (i + 1) * tokens_per_block].tobytes() for i in range(start, stop)]
    view = np.frombuffer(tokens, np.uint32, count=(stop - start) * tokens_per_block, offset=start * tokens_per_block * 4)
    if not _LITTLE:
        view = view.astype("<u4")
    return view.view(f"V{4 * tokens_per_block}").tolist()


# ----------------------------------------------------------------------------------- namespace
@dataclass(frozen=True)
class Namespace:
    """Everything besides the tokens that changes a block's bytes on a rank.

    ``world_size``/``tp_size`` and ``rank_layout`` (``tp``: each rank holds its share of the KV
    heads of every block) matter because each rank stores its own shard under the same key.
    """

    model_id: str
    dtype: str
    num_layers: int
    kv_factor: int
    elems_per_block: int
    tokens_per_block: int
    world_size: int
    tp_size: int
    rank_layout: str = "tp"

    @classmethod
    def from_layout(cls, layout: BlockLayout, model_id: str, world_size: int, tp_size: int | None = None,
                    rank_layout: str = "tp") -> "Namespace":
        return cls(model_id, layout.dtype, layout.num_layers, layout.kv_factor, layout.elems_per_block,
                   layout.tokens_per_block, world_size, world_size if tp_size is None else tp_size, rank_layout)

    @cached_property
    def digest(self) -> bytes:
        """16 bytes naming the namespace (``WorkerConfig.namespace``; stamped on stored blocks)."""
        fields = {"format": NAMESPACE_FORMAT, **{k: getattr(self, k) for k in self.__dataclass_fields__}}
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return xxhash.xxh3_128_digest(canonical.encode("ascii"))

    def key_space(self, cache_salt: str | None = None) -> "KeySpace":
        return KeySpace(self, cache_salt)


class KeySpace:
    """A namespace plus one cache salt: the root every request with that salt chains from."""

    __slots__ = ("namespace", "cache_salt", "tokens_per_block", "seed", "root")

    def __init__(self, namespace: Namespace, cache_salt: str | None = None) -> None:
        self.namespace = namespace
        self.cache_salt = cache_salt
        self.tokens_per_block = namespace.tokens_per_block
        tag = b"\x00" if cache_salt is None else b"\x01" + cache_salt.encode("utf-8")
        root = xxhash.xxh3_128_digest(KEY_FORMAT + namespace.digest + tag)
        lanes = struct.unpack("<QQ", root)
        self.seed: int = lanes[0]
        self.root: tuple[int, int] = lanes

    def block_digests(self, tokens: array, start: int, stop: int) -> np.ndarray:
        """``d_i`` for blocks ``[start, stop)`` as an ``[n, 2]`` uint64 array."""
        blocks = _block_bytes(tokens, self.tokens_per_block, start, stop)
        raw = b"".join(map(xxhash.xxh3_128_digest, blocks, repeat(self.seed)))
        return np.frombuffer(raw, "<u8").reshape(-1, 2)


# ------------------------------------------------------------------------------- chain kernels
class _Powers:
    """``R**k`` and ``R**-k`` (mod 2**64) per lane for k < len, grown on demand."""

    def __init__(self) -> None:
        self.fwd = np.ones((1, 2), np.uint64)
        self.inv = np.ones((1, 2), np.uint64)

    def upto(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n > len(self.fwd):
            size = max(n, 2 * len(self.fwd), 64)
            inv_r = np.array([pow(r, -1, 1 << 64) for r in _R], np.uint64)
            with np.errstate(over="ignore"):
                self.fwd = np.vstack([np.ones((1, 2), np.uint64), np.cumprod(np.tile(_R_ARRAY, (size - 1, 1)), axis=0)])
                self.inv = np.vstack([np.ones((1, 2), np.uint64), np.cumprod(np.tile(inv_r, (size - 1, 1)), axis=0)])
        return self.fwd[:n], self.inv[:n]


_POWERS = _Powers()


def _fmix(x: np.ndarray) -> np.ndarray:
    x ^= x >> np.uint64(33)
    x *= np.uint64(_FMIX[0])
    x ^= x >> np.uint64(33)
    x *= np.uint64(_FMIX[1])
    x ^= x >> np.uint64(33)
    return x


def _fmix_int(x: int) -> int:
    x ^= x >> 33
    x = (x * _FMIX[0]) & _MASK
    x ^= x >> 33
    x = (x * _FMIX[1]) & _MASK
    return x ^ (x >> 33)


def _finalize(acc: np.ndarray, first_index: int) -> np.ndarray:
    """``key_i`` from ``acc_i`` for rows ``i = first_index, first_index + 1, ...`` (in place)."""
    pos = np.arange(first_index + 1, first_index + 1 + len(acc), dtype=np.uint64)[:, None]
    with np.errstate(over="ignore"):
        acc ^= pos * _POS_ARRAY
        return _fmix(acc)


def chain_segment(previous: tuple[int, int], digests: np.ndarray, first_index: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Extend a chain whose last accumulator is ``previous`` by ``digests`` (blocks from ``first_index``).

    Returns the keys of the new blocks and the new last accumulator. Short segments run on Python
    integers, long ones on numpy (``acc_k = R**k * (R*prev + cumsum(d_j * R**-j))``); both give the
    same numbers.
    """
    m = len(digests)
    if m == 0:
        return np.zeros((0, 2), np.uint64), previous
    if m <= _SCALAR_SEGMENT:
        a, b = previous
        out = []
        for i, (d0, d1) in enumerate(digests.tolist()):
            a = (_R[0] * a + d0) & _MASK
            b = (_R[1] * b + d1) & _MASK
            p = first_index + 1 + i
            out.append((_fmix_int(a ^ ((p * _POS[0]) & _MASK)), _fmix_int(b ^ ((p * _POS[1]) & _MASK))))
        return np.array(out, np.uint64), (a, b)
    fwd, inv = _POWERS.upto(m)
    with np.errstate(over="ignore"):
        acc = np.multiply(digests, inv)
        np.cumsum(acc, axis=0, dtype=np.uint64, out=acc)
        acc += np.array(previous, np.uint64) * _R_ARRAY
        acc *= fwd
    last = acc[-1].tolist()
    return _finalize(acc, first_index), (last[0], last[1])


def block_keys(namespace: Namespace, tokens: Sequence[int] | np.ndarray, cache_salt: str | None = None) -> np.ndarray:
    """The BlockKeys of every full block of ``tokens`` (one-shot form of :class:`PrefixHasher`)."""
    hasher = PrefixHasher(namespace.key_space(cache_salt), tokens)
    return hasher.keys(hasher.num_full_blocks).copy()


class PrefixHasher:
    """One request's tokens and the BlockKeys of its full blocks, hashed once, incrementally."""

    __slots__ = ("space", "tokens", "_keys", "_num_keys", "_acc")

    def __init__(self, space: KeySpace, tokens: Sequence[int] | np.ndarray = ()) -> None:
        self.space = space
        self.tokens = token_array(tokens)
        self._keys = np.zeros((0, 2), np.uint64)
        self._num_keys = 0
        self._acc = space.root

    def append(self, tokens: Sequence[int] | np.ndarray) -> None:
        if len(tokens):
            self.tokens.extend(token_array(tokens) if isinstance(tokens, np.ndarray) else tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_full_blocks(self) -> int:
        return len(self.tokens) // self.space.tokens_per_block

    def keys(self, num_blocks: int) -> np.ndarray:
        """Keys of blocks ``[0, num_blocks)`` (a view; hashes only blocks not hashed before)."""
        if num_blocks > self._num_keys:
            if num_blocks > self.num_full_blocks:
                raise ValueError(f"num_blocks={num_blocks} exceeds the {self.num_full_blocks} full blocks known")
            digests = self.space.block_digests(self.tokens, self._num_keys, num_blocks)
            new, self._acc = chain_segment(self._acc, digests, self._num_keys)
            if self._num_keys == 0 and len(new) > _SCALAR_SEGMENT:
                self._keys, self._num_keys = new, num_blocks  # the first segment is adopted as is
                return new
            if num_blocks > len(self._keys):
                grown = np.zeros((max(num_blocks, 2 * len(self._keys), 16), 2), np.uint64)
                grown[: self._num_keys] = self._keys[: self._num_keys]
                self._keys = grown
            self._keys[self._num_keys : num_blocks] = new
            self._num_keys = num_blocks
        return self._keys[:num_blocks]


# ------------------------------------------------------------------------------------- dynamo
def dynamo_salt_hash(salt: str | None = None, lora_name: str | None = None) -> int:
    """Dynamo's ``SaltHash``: XXH3-64 (seed 0) of the compact JSON of the non-None fields."""
    fields = {k: v for k, v in (("salt", salt), ("lora_name", lora_name)) if v is not None}
    return xxhash.xxh3_64_intdigest(json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


class DynamoSequenceChain:
    """One request's DynamoSequenceHashes, extended lazily (only KV events need them)."""

    __slots__ = ("salt_hash", "tokens_per_block", "hashes")

    def __init__(self, salt_hash: int, tokens_per_block: int) -> None:
        self.salt_hash = salt_hash
        self.tokens_per_block = tokens_per_block
        self.hashes = array("Q")

    def upto(self, tokens: array, num_blocks: int) -> np.ndarray:
        """Sequence hashes of blocks ``[0, num_blocks)`` of ``tokens`` (a fresh uint64 array)."""
        return self.range(tokens, 0, num_blocks)

    def range(self, tokens: array, start: int, stop: int) -> np.ndarray:
        """Sequence hashes of blocks ``[start, stop)`` (hashing every block before ``stop`` once)."""
        num_blocks = stop
        have = len(self.hashes)
        if num_blocks > have:
            seed = self.salt_hash
            blocks = _block_bytes(tokens, self.tokens_per_block, have, num_blocks)
            block_hashes = list(map(xxhash.xxh3_64_intdigest, blocks, repeat(seed)))
            parent = self.hashes[-1] if have else None
            pack, h64 = struct.Struct("<QQ").pack, xxhash.xxh3_64_intdigest
            out = self.hashes
            for bh in block_hashes:
                parent = bh if parent is None else h64(pack(parent, bh), seed)
                out.append(parent)
        return np.array(self.hashes[start:stop], np.uint64)


def dynamo_sequence_hashes(tokens: Sequence[int] | np.ndarray, tokens_per_block: int, salt: str | None = None,
                           lora_name: str | None = None) -> np.ndarray:
    """Dynamo's SequenceHash of every full block of ``tokens`` (one-shot form)."""
    arr = token_array(tokens)
    chain = DynamoSequenceChain(dynamo_salt_hash(salt, lora_name), tokens_per_block)
    return chain.upto(arr, len(arr) // tokens_per_block)
