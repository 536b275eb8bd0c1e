"""Paged KV-cache bookkeeping: free list, refcounts, prefix cache, copy-on-write.

Physical blocks hold `block_size` tokens' K/V. A sequence's block table maps
its logical blocks to physical ones. Full blocks are named by a hash chain
(hash of the parent block's hash and this block's tokens) so a later request
with the same prefix reuses them. A freed block keeps its hash and sits in an
LRU of free blocks: it can be revived by a prefix hit until it is reallocated.
Forked sequences share blocks (refcount > 1); writing into a shared block
first copies it (copy-on-write), reported to the runner as (src, dst) pairs.
"""
from __future__ import annotations

from collections import OrderedDict

from pagedserve.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None


def chain_hash(parent: int | None, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.cached: dict[int, int] = {}  # hash -> block id
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write work for the next forward
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found

    # -- accounting ------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        """Fraction of blocks held by live sequences (free cached blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed + num_new_tokens) // self.block_size)
        need = max(0, total - len(seq.block_table))
        if self._needs_cow(seq):
            need += 1
        return need

    def _needs_cow(self, seq: Sequence) -> bool:
        bi = seq.num_computed // self.block_size
        return bi < len(seq.block_table) and self.blocks[seq.block_table[bi]].ref_count > 1

    # -- prefix cache ----------------------------------------------------
    def find_prefix(self, seq: Sequence) -> list[int]:
        """Cached block ids for the longest full-block prefix, always leaving >= 1 token to compute."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[int] = []
        parent = seq.cache_salt
        max_blocks = (seq.num_tokens - 1) // bs  # the last token must be computed to get logits
        for i in range(max_blocks):
            h = chain_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            bid = self.cached.get(h)
            if bid is None:
                break
            hits.append(bid)
            parent = h
        return hits

    # -- allocation ------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix_blocks: list[int] = ()) -> bool:
        revived = sum(1 for b in prefix_blocks if self.blocks[b].ref_count == 0)
        return self._blocks_needed_with_prefix(seq, num_new_tokens, len(prefix_blocks)) <= len(self.free) - revived

    def _blocks_needed_with_prefix(self, seq: Sequence, num_new_tokens: int, num_prefix_blocks: int) -> int:
        if not num_prefix_blocks:
            return self._blocks_needed(seq, num_new_tokens)
        computed = num_prefix_blocks * self.block_size
        total = -(-(computed + num_new_tokens) // self.block_size)
        return max(0, total - num_prefix_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix_blocks: list[int] = ()) -> bool:
        """Make room for the next `num_new_tokens` of `seq`; all or nothing."""
        if (not prefix_blocks and seq.num_computed + num_new_tokens <= len(seq.block_table) * self.block_size
                and not self._needs_cow(seq)):
            return True  # the common decode step: the tokens fit the blocks the sequence holds
        if not self.can_allocate(seq, num_new_tokens, prefix_blocks):
            return False
        if self.enable_prefix_caching and not seq.block_table and seq.num_computed == 0:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += len(prefix_blocks) * self.block_size
        if prefix_blocks:
            assert not seq.block_table and seq.num_computed == 0
            for bid in prefix_blocks:
                self._take(bid)
                seq.block_table.append(bid)
                seq.block_hashes.append(self.blocks[bid].hash)
            seq.num_computed = len(prefix_blocks) * self.block_size
            seq.num_cached_tokens = seq.num_computed
        if self._needs_cow(seq):
            bi = seq.num_computed // self.block_size
            old = seq.block_table[bi]
            new = self._pop_free()
            self.pending_copies.append((old, new))
            self.blocks[old].ref_count -= 1
            seq.block_table[bi] = new
        total = -(-(seq.num_computed + num_new_tokens) // self.block_size)
        while len(seq.block_table) < total:
            seq.block_table.append(self._pop_free())
        return True

    def _take(self, bid: int) -> None:
        b = self.blocks[bid]
        if b.ref_count == 0:
            del self.free[bid]
        b.ref_count += 1

    def _pop_free(self) -> int:
        bid, _ = self.free.popitem(last=False)
        b = self.blocks[bid]
        if b.hash is not None:  # evict from the prefix cache
            if self.cached.get(b.hash) == bid:
                del self.cached[b.hash]
            b.hash = None
        b.ref_count = 1
        return bid

    def commit(self, seq: Sequence, upto: int | None = None) -> None:
        """Register blocks that became full with computed K/V in the prefix cache.

        The scheduler also calls it with `upto` = the end of a chunk it has just scheduled: the
        blocks that chunk fills are registered before they are computed, so a request admitted
        later in the same step finds them and computes only its own suffix (a shared prefix is
        prefilled once per batch, not once per request). That is safe because every attention
        backend writes the whole batch's K/V into the cache before any row attends, layer by layer.
        If the step never runs, `free_seq` unregisters what was not computed."""
        bs = self.block_size
        full = (seq.num_computed if upto is None else upto) // bs
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt
            h = chain_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            seq.block_hashes.append(h)
            if self.enable_prefix_caching:
                b = self.blocks[seq.block_table[i]]
                if b.hash is None and h not in self.cached:
                    b.hash = h
                    self.cached[h] = b.block_id

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Child shares every parent block; writes will copy-on-write."""
        child.block_table = list(parent.block_table)
        for bid in child.block_table:
            self.blocks[bid].ref_count += 1

    def free_seq(self, seq: Sequence) -> None:
        """Release a sequence's blocks; tail blocks go first in the LRU so shared prefixes live longer."""
        computed = seq.num_computed // self.block_size
        for i in range(len(seq.block_table) - 1, -1, -1):
            bid = seq.block_table[i]
            b = self.blocks[bid]
            b.ref_count -= 1
            assert b.ref_count >= 0, f"block {bid} refcount went negative"
            if b.ref_count == 0:
                if i >= computed and b.hash is not None:  # registered by a step that never ran
                    if self.cached.get(b.hash) == bid:
                        del self.cached[b.hash]
                    b.hash = None
                self.free[bid] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past the sequence's computed tokens: the slots of rejected speculative
        drafts. They were allocated for this step alone (never shared, never named in the prefix cache),
        so the pool returns to what a plain decode step would have left."""
        keep = -(-seq.num_computed // self.block_size)
        while len(seq.block_table) > keep:
            bid = seq.block_table.pop()
            b = self.blocks[bid]
            b.ref_count -= 1
            if b.ref_count == 0:
                self.free[bid] = None
                self.free.move_to_end(bid, last=False)  # reused first: it holds nothing worth keeping

    def reset_prefix_cache(self) -> None:
        for b in self.blocks:
            if b.ref_count == 0:
                b.hash = None
        self.cached = {h: bid for h, bid in self.cached.items() if self.blocks[bid].ref_count > 0}

    def check_invariants(self) -> None:
        """Consistency checks used by tests: free list vs refcounts, cache map vs block hashes."""
        for b in self.blocks:
            assert b.ref_count >= 0
            assert (b.ref_count == 0) == (b.block_id in self.free), f"block {b.block_id} free-list mismatch"
        for h, bid in self.cached.items():
            assert self.blocks[bid].hash == h
        for b in self.blocks:
            assert b.hash is None or self.cached.get(b.hash) == b.block_id, f"block {b.block_id} hash not indexed"
