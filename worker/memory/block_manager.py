"""KV pages per sequence: a block table that grows as tokens are computed, shrinks on truncate,
and empties on release. One page is one KV block of page_tokens tokens (every layer)."""

from __future__ import annotations

from worker.memory.allocator import PageAllocator
from worker.sequence import Sequence


class BlockManager:
    def __init__(self, allocator: PageAllocator, page_tokens: int) -> None:
        self.allocator = allocator
        self.page_tokens = page_tokens

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_tokens)

    def pages_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra pages for seq to hold K/V of num_computed + num_new_tokens tokens."""
        total = seq.num_computed + num_new_tokens
        return max(0, self.blocks_for(total) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.pages_needed(seq, num_new_tokens) <= self.allocator.num_free

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        need = self.pages_needed(seq, num_new_tokens)
        seq.block_table.extend(self.allocator.allocate_kv(need, seq.request_id))

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep the K/V of the first num_tokens tokens; pages past them go back to the pool."""
        if num_tokens > seq.num_computed:
            raise ValueError(f"cannot truncate to {num_tokens} > {seq.num_computed} computed")
        keep = self.blocks_for(num_tokens)
        self.allocator.free(seq.block_table[keep:])
        del seq.block_table[keep:]
        seq.num_computed = num_tokens

    def release(self, seq: Sequence) -> None:
        """Free all of seq's pages; its K/V must be recomputed if it runs again."""
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
