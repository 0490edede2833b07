"""The device memory: one preallocated buffer of pages, and the views cut from it.

    buffer [num_pages, E]                                   E = PageGeometry.page_elems
    kv view [num_pages, L, 2, page_tokens, n_kv, head_dim]  K = kv[:, l, 0], V = kv[:, l, 1]
    kv rows [num_pages · L · 2 · page_tokens, kv_size]      the same, one row per token slot
    flat    [num_pages · E]                                 adapter rows, by element offset

Nothing else in the worker allocates KV or adapter storage: both live here, counted in
one budget by the PageAllocator.
"""

from __future__ import annotations

import torch

from worker.memory.allocator import PageAllocator
from worker.memory.geometry import PageGeometry


class MemoryPool:
    def __init__(
        self,
        geometry: PageGeometry,
        num_pages: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if torch.empty((), dtype=dtype).element_size() != geometry.itemsize:
            raise ValueError("the geometry's itemsize does not match the pool dtype")
        self.geometry = geometry
        self.allocator = PageAllocator(num_pages)
        # Zeroed once: a KV slot is always written before it is read, but zeros keep a
        # stray read finite.
        self.buffer = torch.zeros(num_pages, geometry.page_elems, dtype=dtype, device=device)
        g = geometry
        self.kv = self.buffer.view(
            num_pages, g.num_layers, 2, g.page_tokens, g.num_kv_heads, g.head_dim
        )
        self.kv_rows = self.buffer.view(-1, g.kv_size)
        self.flat = self.buffer.view(-1)

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    def kv_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each [num_pages, page_tokens, n_kv, head_dim] (strided views)."""
        return self.kv[:, layer, 0], self.kv[:, layer, 1]

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()
