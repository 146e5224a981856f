"""Block identity: which KV bytes a full block holds, as keys that survive processes and restarts.

Two hashes live here and are kept apart on purpose:

**BlockKey** (ours, 128 bits) is what the leader registers, matches and stamps on disk. Block ``i``
of a request covers tokens ``[i*tpb, (i+1)*tpb)``; its bytes depend on every token before it, on
everything in :class:`Namespace` (model, KV dtype, layout, tokens per block, TP size and how ranks
split a block) and on the request's :class:`RequestScope` (cache salt, LoRA adapter). The key is a
chained hash of the whole prefix::

    key_-1 = XXH3-128(FORMAT || namespace digest || scope tag)             (16 bytes)
    key_i  = XXH3-128(key_{i-1} || tokens of block i as u32 little-endian)   (16 bytes)

so ``key_i`` covers every token up to the end of block ``i``, in order, and the namespace. A real
chain (each step hashes the previous key) rather than a linear combination of per-block digests:
a sum of hash outputs would let a crafted prompt hit a chosen key with a generalized-birthday
search, poisoning a shared prefix. XXH3 is still not a cryptographic hash; tenants are separated by
the cache salt. The chain costs one XXH3 call per block in a tight loop, about as much as the
batched alternatives, and less than converting the prompt's Python list. Never Python's ``hash()``:
fixed bytes in, fixed bytes out, independent of ``PYTHONHASHSEED``.

Keys travel as ``[n, 2]`` uint64 arrays (see :class:`kvbm_core.ops.StepOps`): the digest's two
8-byte halves, each read as a little-endian u64.

**DynamoSequenceHash** (64 bits) is only for KV events. It is the hash Dynamo's KV router computes
from a request's tokens (``compute_block_hash_for_seq`` and ``compute_seq_hash_for_block`` in its
``kv-router`` crate), so that a router indexes the blocks kvbm announces under the numbers it looks
up::

    seed       = 1337 (+ XXH3-64(lora_name, seed 0)) (+ XXH3-64(salt, seed 1))   (wrapping u64 sums)
    local_i    = XXH3-64(tokens of block i as u32 LE, seed)      (the router's LocalBlockHash: "tokens_hash")
    seq_0      = local_0;   seq_i = XXH3-64(seq_{i-1} u64 LE || local_i u64 LE, seed)

Without salt and LoRA name (TRT-LLM passes neither to Dynamo) this is the router's canonical hash
exactly: tokens ``[1, 2, 3, 4]`` in blocks of 4 give ``14643705804678351452``. The salt term is how
newer routers mix a cache namespace into the seed. (Dynamo's own KVBM seeds with a hash of a JSON
salt instead, and its event consolidator recomputes the router's hashes before publishing.)
:attr:`DynamoSequenceChain.lineage_sink` lets a KV-event publisher see each new block's parent
and local hash, which a router's ``Stored`` event carries besides the sequence hash.

Both are computed incrementally per request (:class:`PrefixHasher`, :class:`DynamoSequenceChain`):
a prompt is hashed once and later steps only hash the blocks that became full.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from typing import ClassVar

import numpy as np
import xxhash

from kvbm_core.layout import BlockLayout

KEY_FORMAT = b"kvbm-block-key/1\x00"
NAMESPACE_FORMAT = "kvbm-namespace/2"  # 2: the weights fingerprint joined the namespace

PROCESS_NONCE = os.urandom(16).hex()
"""Unique to this process: what only this process can vouch for (a LoRA task id, weights that could
not be found) is bound to it, so another process never matches such blocks (a restart loses their
reuse, never their correctness)."""

_SMALL = 4  # up to this many blocks are sliced one by one (decode); more go through one numpy view

_TOKEN_CODE = next(c for c in "IL" if array(c).itemsize == 4)
_LITTLE = sys.byteorder == "little"


def token_array(tokens: Sequence[int] | np.ndarray) -> array:
    """Tokens as a compact u32 array; a token outside ``[0, 2**32)`` raises :class:`OverflowError`.

    A list (what TRT-LLM hands over) goes through ``array.fromlist``, about twice as fast as the
    array constructor; converting the list is the largest single cost of matching a long prompt.
    """
    out = array(_TOKEN_CODE)
    if type(tokens) is list:
        out.fromlist(tokens)
    elif isinstance(tokens, np.ndarray):
        if tokens.size and (tokens.min() < 0 or tokens.max() > 0xFFFFFFFF):
            raise OverflowError("token ids must lie in [0, 2**32)")
        out.frombytes(np.ascontiguousarray(tokens, dtype=np.uint32).tobytes())
    else:
        out.extend(tokens)
    return out


def _block_bytes(tokens: array, tokens_per_block: int, start: int, stop: int) -> list[bytes]:
    """Blocks ``[start, stop)`` of ``tokens`` as little-endian u32 bytes, one object per block."""
    if stop <= start:
        return []
    if stop - start <= _SMALL and _LITTLE:  # a block or two (decode): slicing is cheaper
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
    ``weights`` is the fingerprint of the weights served (:mod:`kvbm_core.fingerprint`): the same
    model id with other weights (a fine-tune saved to the same path, a new revision) is another
    namespace.
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
    weights: str = ""

    @classmethod
    def from_layout(cls, layout: BlockLayout, model_id: str, world_size: int, tp_size: int | None = None,
                    rank_layout: str = "tp", weights: str = "") -> "Namespace":
        return cls(model_id, layout.dtype, layout.num_layers, layout.kv_factor, layout.elems_per_block,
                   layout.tokens_per_block, world_size, world_size if tp_size is None else tp_size, rank_layout,
                   weights)

    @cached_property
    def digest(self) -> bytes:
        """16 bytes naming the namespace (``WorkerConfig.namespace``; stamped on stored blocks)."""
        fields = {"format": NAMESPACE_FORMAT, **{k: getattr(self, k) for k in self.__dataclass_fields__}}
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return xxhash.xxh3_128_digest(canonical.encode("ascii"))

    def key_space(self, scope: "RequestScope | None" = None) -> "KeySpace":
        return KeySpace(self, scope or RequestScope())


@dataclass(frozen=True)
class RequestScope:
    """What besides its tokens changes a request's KV bytes, as the engine's request object tells it.

    TensorRT-LLM gives a cache salt either as the string (1.3's Python request) or only as the
    runtime's integer id derived from it (1.2, and every binding): both are kept apart, so a salt is
    never matched across the two forms (a missed hit at worst, never a shared block). A LoRA adapter
    (``lora_task_id``) changes every layer's KV; a task id names an adapter only inside one engine
    process (the client picks it), so LoRA keys also carry :data:`PROCESS_NONCE`. The empty scope is
    a request with neither.
    """

    cache_salt: str | None = None
    cache_salt_id: int | None = None
    lora_task_id: int | None = None

    @property
    def tag(self) -> bytes:
        if self == _NO_SCOPE:
            return b"\x00"
        fields = {k: v for k, v in (("salt", self.cache_salt), ("salt_id", self.cache_salt_id),
                                    ("lora", self.lora_task_id)) if v is not None}
        if self.lora_task_id is not None:
            fields["process"] = PROCESS_NONCE
        return b"\x02" + json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    @property
    def salt_text(self) -> str | None:
        """The salt as one string (KV events carry it this way)."""
        if self.cache_salt is not None:
            return self.cache_salt
        return None if self.cache_salt_id is None else f"id:{self.cache_salt_id}"


_NO_SCOPE = RequestScope()


class KeySpace:
    """A namespace plus one request scope: the root every request of that scope chains from."""

    __slots__ = ("namespace", "scope", "tokens_per_block", "root")

    def __init__(self, namespace: Namespace, scope: RequestScope = _NO_SCOPE) -> None:
        self.namespace = namespace
        self.scope = scope
        self.tokens_per_block = namespace.tokens_per_block
        self.root: bytes = xxhash.xxh3_128_digest(KEY_FORMAT + namespace.digest + scope.tag)

    def chain(self, parent: bytes, tokens: array, start: int, stop: int) -> tuple[bytes, bytes]:
        """Keys of blocks ``[start, stop)`` after ``parent`` (key ``start - 1``, or the root).

        Returns the keys as concatenated 16-byte digests, and the last one.
        """
        h = xxhash.xxh3_128_digest
        out: list[bytes] = []
        append = out.append
        for block in _block_bytes(tokens, self.tokens_per_block, start, stop):
            parent = h(parent + block)
            append(parent)
        return b"".join(out), parent


def keys_array(raw: bytes) -> np.ndarray:
    """Concatenated 16-byte keys as an ``[n, 2]`` uint64 array (halves read little-endian).

    On little-endian machines this is a read-only view of ``raw`` (no copy).
    """
    return np.frombuffer(raw, "<u8").reshape(-1, 2).astype(np.uint64, copy=False)


def block_keys(namespace: Namespace, tokens: Sequence[int] | np.ndarray, scope: RequestScope | None = None
               ) -> np.ndarray:
    """The BlockKeys of every full block of ``tokens`` (one-shot form of :class:`PrefixHasher`)."""
    hasher = PrefixHasher(namespace.key_space(scope), tokens)
    return hasher.keys(hasher.num_full_blocks)


class PrefixHasher:
    """One request's tokens and the BlockKeys of its full blocks, hashed once, incrementally."""

    __slots__ = ("space", "tokens", "_raw", "_last")

    def __init__(self, space: KeySpace, tokens: Sequence[int] | np.ndarray = ()) -> None:
        self.space = space
        self.tokens = token_array(tokens)
        self._raw = bytearray()  # 16 bytes per hashed block, never exported (callers get copies)
        self._last = space.root  # key of the last hashed block (the root before any)

    def append(self, tokens: Sequence[int] | np.ndarray) -> None:
        if type(tokens) is list:
            self.tokens.fromlist(tokens)
        elif len(tokens):
            self.tokens.extend(token_array(tokens))

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_full_blocks(self) -> int:
        return len(self.tokens) // self.space.tokens_per_block

    @property
    def num_hashed(self) -> int:
        return len(self._raw) // 16

    def key_bytes(self, start: int, stop: int) -> bytes:
        """Keys of blocks ``[start, stop)`` as concatenated 16-byte digests (hashing what is missing)."""
        have = len(self._raw) // 16
        if stop > have:
            if stop > self.num_full_blocks:
                raise ValueError(f"block {stop - 1} is not full: {self.num_full_blocks} full blocks known")
            raw, self._last = self.space.chain(self._last, self.tokens, have, stop)
            self._raw += raw
            if start == have:
                return raw
        with memoryview(self._raw) as view:  # released at once: the bytearray may grow later
            return view[16 * start : 16 * stop].tobytes()

    def keys(self, num_blocks: int, start: int = 0) -> np.ndarray:
        """Keys of blocks ``[start, num_blocks)`` as a fresh ``[n, 2]`` uint64 array."""
        return keys_array(self.key_bytes(start, num_blocks))


# ------------------------------------------------------------------------------------- dynamo
ROUTER_SEED = 1337
"""XXH3 seed of Dynamo's KV router (``XXH3_SEED``) for requests without salt or LoRA name."""
_U64 = (1 << 64) - 1


def dynamo_salt_hash(salt: str | None = None, lora_name: str | None = None) -> int:
    """The seed of a request's router hashes: :data:`ROUTER_SEED`, plus XXH3-64 of the LoRA name
    (seed 0) and of the salt (seed 1) when given (empty strings count as absent), wrapping at 2**64."""
    seed = ROUTER_SEED
    if lora_name:
        seed += xxhash.xxh3_64_intdigest(lora_name.encode("utf-8"), 0)
    if salt:
        seed += xxhash.xxh3_64_intdigest(salt.encode("utf-8"), 1)
    return seed & _U64


LineageSink = Callable[[int | None, array, list[int]], None]
"""``sink(parent, sequence_hashes, local_hashes)`` for blocks just hashed, in order: ``parent`` is the
sequence hash before the first of them (None at the start of a request)."""


class DynamoSequenceChain:
    """One request's DynamoSequenceHashes, extended lazily (only KV events need them)."""

    __slots__ = ("salt_hash", "tokens_per_block", "hashes")

    lineage_sink: ClassVar[LineageSink | None] = None
    """Set by a KV-event publisher (process-wide) to learn each new block's parent and local hash."""

    def __init__(self, salt_hash: int, tokens_per_block: int) -> None:
        self.salt_hash = salt_hash
        self.tokens_per_block = tokens_per_block
        self.hashes = array("Q")

    def upto(self, tokens: array, num_blocks: int) -> np.ndarray:
        """Sequence hashes of blocks ``[0, num_blocks)`` of ``tokens`` (a fresh uint64 array)."""
        return np.frombuffer(self.range_bytes(tokens, 0, num_blocks), np.uint64).copy()

    def range_bytes(self, tokens: array, start: int, stop: int) -> bytes:
        """Sequence hashes of blocks ``[start, stop)`` as native u64 bytes (each block hashed once)."""
        num_blocks = stop
        have = len(self.hashes)
        if num_blocks > have:
            seed = self.salt_hash
            blocks = _block_bytes(tokens, self.tokens_per_block, have, num_blocks)
            block_hashes = list(map(xxhash.xxh3_64_intdigest, blocks, repeat(seed)))
            parent = first_parent = self.hashes[-1] if have else None
            pack, h64 = struct.Struct("<QQ").pack, xxhash.xxh3_64_intdigest
            out = self.hashes
            for bh in block_hashes:
                parent = bh if parent is None else h64(pack(parent, bh), seed)
                out.append(parent)
            sink = DynamoSequenceChain.lineage_sink
            if sink is not None:
                sink(first_parent, out[have:], block_hashes)
        return self.hashes[start:stop].tobytes()


def dynamo_sequence_hashes(tokens: Sequence[int] | np.ndarray, tokens_per_block: int, salt: str | None = None,
                           lora_name: str | None = None) -> np.ndarray:
    """Dynamo's SequenceHash of every full block of ``tokens`` (one-shot form)."""
    arr = token_array(tokens)
    chain = DynamoSequenceChain(dynamo_salt_hash(salt, lora_name), tokens_per_block)
    return chain.upto(arr, len(arr) // tokens_per_block)
