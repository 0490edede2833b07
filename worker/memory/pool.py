"""The device memory: one preallocated buffer of pages, and the views cut from it.

    buffer [num_pages, E]                                   E = PageGeometry.page_elems
    kv view [num_pages, L, 2, page_tokens, n_kv, head_dim]  K = kv[:, l, 0], V = kv[:, l, 1]
    kv rows [num_pages · L · 2 · page_tokens, kv_size]      the same, one row per token slot
    flat    [num_pages · E]                                 the buffer, by element offset
    lora    [num_pages · E · ρ]                             adapter rows, by offset in their
                                                            own dtype (ρ = its elements per
                                                            pool element: 1, or 2 for bf16
                                                            rows in a float32 pool)

Nothing else in the worker allocates KV or adapter storage: both live here, counted in
one budget by the PageAllocator.
"""

from __future__ import annotations

import torch

from worker.memory.allocator import PageAllocator
from worker.memory.geometry import PageGeometry


def lora_dtype_for(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype adapter rows are stored in (pages and host cache): EngineConfig.lora_dtype.

    auto: the model's. bfloat16 under a float32 model on the CPU halves the bytes a LoRA
    step reads (the C kernel widens each weight to float32 as it loads it; like vLLM's
    --lora-dtype); on other devices the kernels read adapters in the model's dtype.
    """
    dtype = model_dtype if name == "auto" else getattr(torch, name)
    if dtype == model_dtype:
        return dtype
    if dtype == torch.bfloat16 and model_dtype == torch.float32 and device.type == "cpu":
        return dtype
    raise ValueError(
        f"lora_dtype {name} with a {str(model_dtype).removeprefix('torch.')} model on "
        f"{device.type}: adapters are stored in the model's dtype, or in bfloat16 under a "
        "float32 model on the CPU"
    )


class MemoryPool:
    def __init__(
        self,
        geometry: PageGeometry,
        num_pages: int,
        dtype: torch.dtype,
        device: torch.device,
        lora_dtype: torch.dtype | None = None,  # the adapter rows' (default: the pool's)
    ) -> None:
        if torch.empty((), dtype=dtype).element_size() != geometry.itemsize:
            raise ValueError("the geometry's itemsize does not match the pool dtype")
        lora_dtype = dtype if lora_dtype is None else lora_dtype
        lora_itemsize = torch.empty((), dtype=lora_dtype).element_size()
        if geometry.itemsize % lora_itemsize:
            raise ValueError(f"adapter rows in {lora_dtype} do not tile a {dtype} pool")
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
        # Adapter rows are addressed in their own dtype (row tables, layout, kernels).
        self.lora = self.flat.view(lora_dtype)
        self.lora_page_elems = g.page_elems * (g.itemsize // lora_itemsize)

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    def pages_for_lora_elems(self, elems: int) -> int:
        """Pages for `elems` adapter elements laid contiguously (a lower bound when scattered)."""
        return -(-elems // self.lora_page_elems)

    def kv_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each [num_pages, page_tokens, n_kv, head_dim] (strided views)."""
        return self.kv[:, layer, 0], self.kv[:, layer, 1]

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()
