"""Page geometry: one page holds one KV block (page_tokens tokens of K and V, every layer).

    E = L · 2 · page_tokens · kv_size elements        (docs/memory.md works out the padding)

Adapter rows of any width fill pages in a row stream; a page is a run of E elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PageGeometry:
    num_layers: int  # L
    page_tokens: int  # tokens per KV block
    num_kv_heads: int
    head_dim: int
    itemsize: int  # bytes per element of the pool's dtype

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def page_elems(self) -> int:
        """E: K and V of page_tokens tokens for every layer."""
        return self.num_layers * 2 * self.page_tokens * self.kv_size

    @property
    def page_bytes(self) -> int:
        return self.page_elems * self.itemsize

    def pages_for_budget(self, memory_mb: int) -> int:
        """How many pages fit in memory_mb MiB (at least one)."""
        return max(1, memory_mb * 2**20 // self.page_bytes)

    def pages_for_elems(self, elems: int) -> int:
        """Pages for `elems` elements laid contiguously (a lower bound when scattered)."""
        return math.ceil(elems / self.page_elems)
