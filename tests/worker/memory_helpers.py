"""Small page pools, adapter managers and schedulers for tests (no model needed)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from worker.lora.adapter import HostAdapter, HostLora
from worker.lora.host_cache import HostCache
from worker.lora.manager import AdapterManager
from worker.lora.resident import ModelShape
from worker.memory.block_manager import BlockManager
from worker.memory.geometry import PageGeometry
from worker.memory.pool import MemoryPool
from worker.scheduler import Scheduler, SchedulerLimits

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_shape(layers: int = 2, hidden: int = 16, kv: int = 8, mlp: int = 32) -> ModelShape:
    """A model with hidden 16, kv 8 (q 16), MLP 32 — rows of 8, 16 and 32 elements."""
    return ModelShape(
        num_layers=layers,
        in_widths=(hidden, hidden, hidden, mlp),
        out_widths=(hidden, kv, kv, hidden, mlp, mlp, hidden),
        out_cols=(
            (slice(0, hidden), slice(hidden, hidden + kv), slice(hidden + kv, hidden + 2 * kv)),
            (slice(0, hidden),),
            (slice(0, mlp), slice(mlp, 2 * mlp)),
            (slice(0, hidden),),
        ),
        granule=math.gcd(hidden, kv, mlp),
    )


def tiny_pool(
    num_pages: int, page_tokens: int = 4, layers: int = 2, lora_dtype: torch.dtype | None = None
) -> MemoryPool:
    """Pages of layers · 2 · page_tokens · 8 elements (kv = 2 heads of 4), float32."""
    geometry = PageGeometry(layers, page_tokens, 2, 4, itemsize=4)
    return MemoryPool(geometry, num_pages, torch.float32, torch.device("cpu"), lora_dtype)


def random_host_adapter(
    adapter_id: str,
    ranks: dict[str, int],
    shape: ModelShape,
    seed: int = 0,
    layers: tuple[int, ...] | None = None,
) -> HostAdapter:
    """A HostAdapter with rank ranks[module] on every layer (or `layers`), random weights."""
    gen = torch.Generator().manual_seed(seed)
    in_of = {
        m: shape.in_widths[g] for g, ms in enumerate(((0, 1, 2), (3,), (4, 5), (6,))) for m in ms
    }
    modules = {}
    for layer in layers if layers is not None else range(shape.num_layers):
        for name, r in ranks.items():
            m = MODULES.index(name)
            a = torch.randn(r, in_of[m], generator=gen)
            b = torch.randn(r, shape.out_widths[m], generator=gen)
            modules[(layer, name)] = HostLora(a, b)
    nbytes = sum(w.a.nbytes + w.b.nbytes for w in modules.values())
    return HostAdapter(adapter_id, modules, nbytes)


def manager_with(
    pool: MemoryPool, shape: ModelShape, adapters: dict[str, HostAdapter]
) -> AdapterManager:
    """An AdapterManager whose host loads return the given adapters."""

    def load(adapter_id: str, _source: Path) -> HostAdapter:
        return adapters[adapter_id]

    manager = AdapterManager(pool, shape, HostCache(load, 2**40))
    for adapter_id in adapters:
        manager.register(adapter_id, Path(f"/nowhere/{adapter_id}"))
    return manager


def wait_on_host(manager: AdapterManager, adapter_id: str, timeout_s: float = 60.0) -> None:
    """Start the adapter's host load and wait (generous deadline) until it is there."""
    import time

    deadline = time.monotonic() + timeout_s
    manager.prefetch(adapter_id)
    while manager.host.peek(adapter_id) is None:
        assert time.monotonic() < deadline, f"adapter {adapter_id} never loaded"
        assert manager.error(adapter_id) is None, manager.error(adapter_id)
        time.sleep(0.001)


def make_scheduler(
    num_pages: int,
    page_tokens: int,
    limits: SchedulerLimits,
    adapters: dict[str, HostAdapter] | None = None,
    shape: ModelShape | None = None,
    on_pool: Callable[[MemoryPool], None] | None = None,
) -> Scheduler:
    pool = tiny_pool(num_pages, page_tokens)
    if on_pool is not None:
        on_pool(pool)
    manager = manager_with(pool, shape or tiny_shape(), adapters or {})
    return Scheduler(BlockManager(pool.allocator, page_tokens), manager, limits)
