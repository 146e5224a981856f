"""The device block manager of the reference executor: TRT-LLM's V1 ``KVCacheManager`` semantics.

It owns which pool block belongs to which request, never the bytes. Rules, as TRT-LLM applies them
with block reuse on and partial reuse off:

- ``add_sequence`` (a request's first context chunk): match the prompt's full blocks against the
  reuse tree (at most ``(prompt_len - 1) // tokens_per_block``, so one token is always computed),
  ask the connector through a callback with the matched token count, then allocate the rest of
  ``ceil(prompt_len / tokens_per_block)`` blocks. Matched blocks are shared, not copied.
- ``add_token`` (a decode step): one more block when the new token's position starts a block.
- Full blocks whose KV has been written become reusable: prompt blocks once the prefill is done
  (``store_context_blocks``), all of them when the request is released. A block is keyed by its
  tokens under its parent block, from a ``root`` per request kind: what besides the tokens changes
  KV (the executor passes the cache salt id and the LoRA adapter). A radix tree over whole blocks.
  :meth:`KvCacheManager.block_hashes` chains a 64-bit hash over a sequence's full blocks from the
  same root (TRT-LLM 1.3's ``RequestData.block_hashes``).
- Released blocks that are in the tree stay cached until evicted: lowest retention priority first,
  then least recently released, deeper blocks first; evicting a block drops its subtree from the
  tree. Other released blocks go straight back to the free list.
- ``release(..., pin=True)`` (an asynchronous save) keeps every block of the request held until
  ``unpin``.
"""

from __future__ import annotations

import heapq
import struct
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash

PriorityOf = Callable[[int], int]  # block index in the request -> retention priority


@dataclass
class ManagerStats:
    """Running totals since the manager was built."""

    reused_blocks: int = 0  # prompt blocks served from the reuse tree
    stored_blocks: int = 0  # blocks entered into the reuse tree
    evicted_blocks: int = 0  # cached blocks dropped from the tree to make room
    allocated_blocks: int = 0  # blocks handed out fresh (from the free list or by eviction)


class _Node:
    __slots__ = ("block", "parent", "key", "children", "depth")

    def __init__(self, block: int, parent: _Node | None, key: tuple[int, ...], depth: int):
        self.block = block
        self.parent = parent
        self.key = key
        self.children: dict[tuple[int, ...], _Node] = {}
        self.depth = depth


@dataclass
class _Sequence:
    blocks: list[int]
    num_tokens: int  # KV positions the sequence holds room for
    root: Hashable
    pinned: bool = False


@dataclass
class KvCacheManager:
    num_blocks: int
    tokens_per_block: int
    enable_block_reuse: bool = True
    stats: ManagerStats = field(default_factory=ManagerStats)

    def __post_init__(self) -> None:
        self._free: deque[int] = deque(range(self.num_blocks))
        self._refs = [0] * self.num_blocks
        self._nodes: dict[int, _Node] = {}  # block id -> its place in the reuse tree
        self._roots: dict[Hashable, _Node] = {}
        self._evictable: dict[int, tuple[int, int, int, int]] = {}  # block id -> its live heap key
        self._heap: list[tuple[int, int, int, int]] = []
        self._priority: dict[int, int] = {}
        self._tick = 0
        self._seqs: dict[int, _Sequence] = {}

    # -- capacity -----------------------------------------------------------------------------

    @property
    def num_available_blocks(self) -> int:
        """Blocks a new allocation can take: free ones plus cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._nodes)

    def blocks_held(self, request_id: int) -> int:
        return len(self._seqs[request_id].blocks)

    @property
    def num_pinned_blocks(self) -> int:
        """Blocks held only because a finished request's async save pins them."""
        return sum(len(seq.blocks) for seq in self._seqs.values() if seq.pinned)

    def block_hashes(self, tokens: Sequence[int], root: Hashable) -> list[int]:
        """A 64-bit hash per full block of ``tokens``, each chained on the one before, seeded by ``root``."""
        tpb = self.tokens_per_block
        parent = xxhash.xxh3_64_intdigest(repr(root).encode())
        out: list[int] = []
        full = len(tokens) // tpb
        words = np.asarray(tokens[: full * tpb], np.uint32).tobytes()
        for i in range(full):
            parent = xxhash.xxh3_64_intdigest(struct.pack("<Q", parent) + words[i * tpb * 4 : (i + 1) * tpb * 4])
            out.append(parent)
        return out

    # -- request lifecycle --------------------------------------------------------------------

    def add_sequence(
        self,
        request_id: int,
        prompt: Sequence[int],
        root: Hashable,
        connector_match: Callable[[int], int] | None,
    ) -> tuple[int, int]:
        """Allocate the prompt's blocks; returns (device-reused tokens, connector-promised tokens)."""
        if request_id in self._seqs:
            raise RuntimeError(f"request {request_id} already holds KV blocks")
        tpb = self.tokens_per_block
        matched = self._match(root, prompt, (len(prompt) - 1) // tpb) if self.enable_block_reuse else []
        reused = len(matched) * tpb
        external = connector_match(reused) if connector_match is not None else 0
        fresh = self._allocate(-(-len(prompt) // tpb) - len(matched))
        self._seqs[request_id] = _Sequence(matched + fresh, len(prompt), root)
        return reused, external

    def add_token(self, request_id: int) -> int | None:
        """Room for one more KV position; the new block's id when that position starts a block."""
        seq = self._seqs[request_id]
        seq.num_tokens += 1
        if (seq.num_tokens - 1) % self.tokens_per_block:
            return None
        (block,) = self._allocate(1)
        seq.blocks.append(block)
        return block

    def get_cache_indices(self, request_id: int) -> list[int]:
        return list(self._seqs[request_id].blocks)

    def store_context_blocks(
        self, request_id: int, tokens: Sequence[int], kv_len: int, priority_of: PriorityOf
    ) -> None:
        """Make the full blocks of a finished prefill reusable while the request keeps decoding."""
        if self.enable_block_reuse:
            self._register(self._seqs[request_id], tokens, kv_len, priority_of)

    def release(
        self, request_id: int, tokens: Sequence[int], kv_len: int, priority_of: PriorityOf, pin: bool = False
    ) -> None:
        """The request is done: cache its full blocks whose KV is valid, then let go (or pin)."""
        seq = self._seqs[request_id]
        if self.enable_block_reuse:
            self._register(seq, tokens, kv_len, priority_of)
            for i, block in enumerate(seq.blocks):
                if block in self._nodes:
                    self._priority[block] = priority_of(i)
        if pin:
            seq.pinned = True
        else:
            self._drop(request_id)

    def unpin(self, request_id: int) -> None:
        if not self._seqs[request_id].pinned:
            raise RuntimeError(f"request {request_id} has no pinned blocks")
        self._drop(request_id)

    # -- internals ----------------------------------------------------------------------------

    def _match(self, root: Hashable, prompt: Sequence[int], max_blocks: int) -> list[int]:
        tpb = self.tokens_per_block
        node = self._roots.get(root)
        matched: list[int] = []
        while node is not None and len(matched) < max_blocks:
            i = len(matched)
            node = node.children.get(tuple(prompt[i * tpb : (i + 1) * tpb]))
            if node is not None:
                self._ref(node.block)
                matched.append(node.block)
        self.stats.reused_blocks += len(matched)
        return matched

    def _register(self, seq: _Sequence, tokens: Sequence[int], kv_len: int, priority_of: PriorityOf) -> None:
        tpb = self.tokens_per_block
        full = min(kv_len, len(tokens)) // tpb
        node = self._roots.setdefault(seq.root, _Node(-1, None, (), 0))
        for i in range(min(full, len(seq.blocks))):
            key = tuple(tokens[i * tpb : (i + 1) * tpb])
            child = node.children.get(key)
            if child is None:
                block = seq.blocks[i]
                if block in self._nodes:  # cached under another path: its bytes are not this prefix
                    return
                child = _Node(block, node, key, node.depth + 1)
                node.children[key] = child
                self._nodes[block] = child
                self._priority[block] = priority_of(i)
                self.stats.stored_blocks += 1
            node = child  # an equal block cached earlier: this request's copy stays private

    def _ref(self, block: int) -> None:
        self._refs[block] += 1
        self._evictable.pop(block, None)

    def _drop(self, request_id: int) -> None:
        seq = self._seqs.pop(request_id)
        self._tick += 1
        for block in seq.blocks:
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            node = self._nodes.get(block)
            if node is None:
                self._free.append(block)
            else:
                key = (self._priority.get(block, 0), self._tick, -node.depth, block)
                self._evictable[block] = key
                heapq.heappush(self._heap, key)

    def _allocate(self, count: int) -> list[int]:
        out: list[int] = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block = self._evict_one()
            self._refs[block] = 1
            out.append(block)
        self.stats.allocated_blocks += count
        return out

    def _evict_one(self) -> int:
        while self._heap:
            key = heapq.heappop(self._heap)
            block = key[3]
            if self._evictable.get(block) != key:
                continue  # stale: taken again, re-released, or dropped with a subtree
            self._drop_subtree(self._nodes[block])
            return self._free.pop()  # the evicted block, appended last by _drop_subtree
        raise RuntimeError("KV pool exhausted: the scheduler admitted more blocks than exist")

    def _drop_subtree(self, root: _Node) -> None:
        assert root.parent is not None
        del root.parent.children[root.key]
        stack = [root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            del self._nodes[node.block]
            self._priority.pop(node.block, None)
            self.stats.evicted_blocks += 1
            if self._evictable.pop(node.block, None) is not None and node is not root:
                self._free.appendleft(node.block)
        self._free.append(root.block)
