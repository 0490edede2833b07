"""KV pages per sequence: a block table grows as tokens are computed, shrinks to nothing on free."""

from __future__ import annotations

from worker.memory.page_pool import PagePool
from worker.sequence import Sequence


class BlockManager:
    def __init__(self, pool: PagePool, page_size: int) -> None:
        self.pool = pool
        self.page_size = page_size

    def pages_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra pages for seq to hold K/V of num_computed + num_new_tokens tokens."""
        total = seq.num_computed + num_new_tokens
        return max(0, -(-total // self.page_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.pages_needed(seq, num_new_tokens) <= self.pool.num_free

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        seq.block_table.extend(self.pool.allocate(self.pages_needed(seq, num_new_tokens)))

    def release(self, seq: Sequence) -> None:
        """Free all of seq's pages; its K/V must be recomputed if it runs again."""
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
