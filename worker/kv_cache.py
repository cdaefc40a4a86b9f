"""KVCacheManager: paged KV cache bookkeeping with a prefix cache (pure Python, no torch).

The cache is `num_blocks` fixed-size blocks. Each request owns a block table; blocks are reference
counted so requests sharing a prompt prefix share its blocks. A full block whose tokens are all in the
cache is registered under a chained hash (parent block's hash + the block's token ids), so a later
request with the same prefix finds it. Blocks nobody references sit in an LRU free queue; cached ones
keep their contents (and stay findable) until the queue hands them out again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass


def block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Chained hash of one full block: covers the whole prefix up to and including this block."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


class KVCacheManager:
    """Allocates, shares and frees KV cache blocks for requests identified by id."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # chained hash -> block id
        self.tables: dict[str, list[int]] = {}  # request id -> block ids
        self.hashes: dict[str, list[bytes]] = {}  # request id -> hashes of its registered full blocks
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # ---- queries ----

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens looked up."""
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def has_request(self, request_id: str) -> bool:
        return request_id in self.tables

    # ---- prefix cache ----

    def find_cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Block ids caching the longest run of full leading blocks of `token_ids`.

        The last token is never covered: it must be computed to produce logits to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        found, parent = [], None
        for i in range((len(token_ids) - 1) // self.block_size):
            parent = block_hash(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_id = self.cached.get(parent)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def record_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.num_queried_tokens += num_prompt_tokens
        self.num_hit_tokens += num_hit_tokens

    def cache_full_blocks(self, request_id: str, token_ids: list[int], num_computed_tokens: int) -> None:
        """Register the request's blocks that became full of computed tokens since the last call."""
        if not self.enable_prefix_caching:
            return
        table, hashes = self.tables[request_id], self.hashes[request_id]
        for i in range(len(hashes), num_computed_tokens // self.block_size):
            parent = hashes[-1] if hashes else None
            h = block_hash(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            hashes.append(h)
            block = self.blocks[table[i]]
            if block.hash is None and h not in self.cached:
                block.hash = h
                self.cached[h] = block.block_id

    # ---- allocation ----

    def can_allocate(self, request_id: str, num_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Whether allocate() would succeed for a table covering `num_tokens`."""
        have = len(self.tables.get(request_id, ())) or len(cached_blocks)
        reclaimed = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        return self.blocks_needed(num_tokens) - have <= len(self.free_queue) - reclaimed

    def allocate(self, request_id: str, num_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Grow the request's table to hold `num_tokens` tokens; False (and no change) if out of blocks.

        On the request's first allocation `cached_blocks` (from find_cached_prefix) start its table.
        """
        if not self.can_allocate(request_id, num_tokens, cached_blocks):
            return False
        if request_id not in self.tables:
            self.tables[request_id] = [self._take(b) for b in cached_blocks]
            self.hashes[request_id] = [self.blocks[b].hash for b in cached_blocks]
        table = self.tables[request_id]
        while len(table) < self.blocks_needed(num_tokens):
            table.append(self._take_free())
        return True

    def free(self, request_id: str) -> None:
        """Drop the request's references; unreferenced blocks go to the free queue (tail first)."""
        table = self.tables.pop(request_id, None)
        self.hashes.pop(request_id, None)
        if table is None:
            return
        for block_id in reversed(table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} of {request_id!r} freed twice (ref_count {block.ref_count})")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1
        return block_id

    def _take_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict: its contents are about to be overwritten
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (blocks stay allocated to their requests)."""
        for block in self.blocks:
            block.hash = None
        self.cached.clear()
        for request_id in self.hashes:
            self.hashes[request_id] = []

    def check_invariants(self) -> None:
        """Raise AssertionError if reference counts, tables, free queue and cache disagree (tests)."""
        refs = [0] * self.num_blocks
        for table in self.tables.values():
            for block_id in table:
                refs[block_id] += 1
        for block in self.blocks:
            bid = block.block_id
            assert block.ref_count == refs[bid], f"block {bid}: ref_count {block.ref_count} != {refs[bid]} references"
            assert (block.ref_count == 0) == (bid in self.free_queue), f"block {bid}: free-queue membership mismatch"
        for h, block_id in self.cached.items():
            assert self.blocks[block_id].hash == h, f"cached hash of block {block_id} mismatch"
