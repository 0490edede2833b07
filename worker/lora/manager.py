"""Adapters the engine knows, across tiers: registered sources → host memory → device pages.

An adapter is registered by id with a source (a PEFT directory or a registry blob). A
request for it starts a background load into the host tier; the scheduler admits the
request once the adapter is on the host, paging it into the pool (same free list and
budget as the KV cache). Idle adapters are evicted from the device LRU-first when the
pool runs short; adapters of the running batch are pinned by the scheduler.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from worker.kernels.lora_meta import PROJECTIONS
from worker.lora.adapter import HostAdapter
from worker.lora.host_cache import HostCache
from worker.lora.layout import DoesNotFit, MatrixSpec, matrix_specs, place_rows, total_elems
from worker.lora.resident import ModelShape, ResidentAdapter, page_in
from worker.memory.allocator import OutOfPages
from worker.memory.pool import MemoryPool

SPEC_CACHE_SIZE = 4096  # adapters whose layouts are remembered


class Tier(enum.Enum):
    DEVICE = "device"
    HOST = "host"
    LOADING = "loading"
    ABSENT = "absent"  # registered, nothing loaded
    FAILED = "failed"


@dataclass
class DeviceStats:
    hits: int = 0  # admitted with the adapter already in device pages
    misses: int = 0  # paged in at admission
    evictions: int = 0
    page_in_seconds: float = 0.0
    prefetched: int = 0  # host loads started before any request for the adapter was admitted
    prefetched_in_time: int = 0  # ... that were on the host when first needed


class AdapterManager:
    def __init__(self, pool: MemoryPool, shape: ModelShape, host: HostCache) -> None:
        self.pool = pool
        self.shape = shape
        self.host = host
        self.sources: dict[str, Path] = {}
        self.resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # LRU order
        self.stats = DeviceStats()
        self._prefetched: set[str] = set()
        # adapter id → its matrix specs (LRU; a source changes only through forget())
        self._spec_cache: OrderedDict[str, list[MatrixSpec]] = OrderedDict()

    # -- registration -----------------------------------------------------------

    def register(self, adapter_id: str, source: Path) -> None:
        if self.sources.get(adapter_id) == source:
            return
        self.forget(adapter_id)
        self.sources[adapter_id] = source

    def forget(self, adapter_id: str) -> None:
        """Drop every tier's copy (the source changed or the blob is gone)."""
        self.sources.pop(adapter_id, None)
        self._spec_cache.pop(adapter_id, None)
        self.host.drop(adapter_id)
        if adapter_id in self.resident:
            self.evict(adapter_id)

    def knows(self, adapter_id: str) -> bool:
        return adapter_id in self.sources

    # -- tiers --------------------------------------------------------------------

    def tier(self, adapter_id: str) -> Tier:
        if adapter_id in self.resident:
            return Tier.DEVICE
        if self.host.error(adapter_id) is not None:
            return Tier.FAILED
        if self.host.peek(adapter_id) is not None:
            return Tier.HOST
        return Tier.LOADING if self.host.loading(adapter_id) else Tier.ABSENT

    def error(self, adapter_id: str) -> str | None:
        return self.host.error(adapter_id)

    def prefetch(self, adapter_id: str, ahead: bool = False) -> None:
        """Start the host load of an adapter that is not on the device (non-blocking)."""
        if adapter_id in self.resident or adapter_id not in self.sources:
            return
        if ahead and self.tier(adapter_id) is Tier.ABSENT:
            self._prefetched.add(adapter_id)
            self.stats.prefetched += 1
        self.host.request(adapter_id, self.sources[adapter_id])

    def ready(self, adapter_id: str) -> bool:
        """On the device, or on the host so it can be paged in now."""
        if adapter_id in self.resident:
            return True
        self.prefetch(adapter_id)
        ready = self.host.get(adapter_id) is not None
        if adapter_id in self._prefetched:
            self._prefetched.discard(adapter_id)
            self.stats.prefetched_in_time += int(ready)
        return ready

    # -- device pages -------------------------------------------------------------

    def pages_needed(self, adapter_id: str | None) -> int:
        """Pages a page-in takes (0 when resident or for the base model)."""
        if adapter_id is None or adapter_id in self.resident:
            return 0
        adapter = self.host.peek(adapter_id)
        if adapter is None:
            raise KeyError(f"adapter {adapter_id!r} is not on the host")
        return self.pool.pages_for_lora_elems(total_elems(self._specs(adapter)))

    def make_resident(self, adapter_id: str, touch: bool = True) -> ResidentAdapter:
        """The adapter in device pages, paging it in from the host tier if needed."""
        if adapter_id in self.resident:
            self.stats.hits += touch
            self.resident.move_to_end(adapter_id)
            return self.resident[adapter_id]
        adapter = self.host.peek(adapter_id)
        if adapter is None:
            raise KeyError(f"adapter {adapter_id!r} is not on the host")
        t0 = time.perf_counter()
        specs = self._specs(adapter)
        pages, addresses = self._allocate(adapter_id, specs)
        resident = page_in(adapter, specs, addresses, pages, self.pool, self.shape)
        self.stats.page_in_seconds += time.perf_counter() - t0
        self.stats.misses += 1
        self.resident[adapter_id] = resident
        return resident

    def evictable(self, pinned: set[str]) -> list[str]:
        """Resident adapters not pinned, least recently used first."""
        return [a for a in self.resident if a not in pinned]

    def evict(self, adapter_id: str) -> int:
        resident = self.resident.pop(adapter_id)
        self.pool.allocator.free(resident.pages)
        self.stats.evictions += 1
        return len(resident.pages)

    def get(self, adapter_id: str) -> ResidentAdapter:
        return self.resident[adapter_id]

    def padding_elems(self) -> tuple[int, int]:
        """(elements of adapter pages, elements of adapter weights) over resident adapters,
        both counted in the adapters' dtype."""
        page_elems = self.pool.lora_page_elems
        held = sum(len(r.pages) * page_elems for r in self.resident.values())
        return held, sum(r.weight_elems for r in self.resident.values())

    def _specs(self, adapter: HostAdapter) -> list[MatrixSpec]:
        """The adapter's matrices in page order; computed once per host copy (admission
        asks for every waiting request's page count on every step)."""
        specs = self._spec_cache.get(adapter.adapter_id)
        if specs is None:
            specs = self._spec_cache[adapter.adapter_id] = self._layout(adapter)
            if len(self._spec_cache) > SPEC_CACHE_SIZE:
                self._spec_cache.popitem(last=False)
        else:
            self._spec_cache.move_to_end(adapter.adapter_id)
        return specs

    def _layout(self, adapter: HostAdapter) -> list[MatrixSpec]:
        ranks = {
            (layer, PROJECTIONS.index(module)): lora.a.shape[0]
            for (layer, module), lora in adapter.modules.items()
        }
        s = self.shape
        return matrix_specs(ranks, s.in_widths, s.out_widths, s.num_layers)

    def _allocate(self, adapter_id: str, specs: list[MatrixSpec]) -> tuple[list[int], list[int]]:
        """Pages for the rows (a contiguous run when there is one) and each row's address."""
        allocator, page_elems = self.pool.allocator, self.pool.lora_page_elems
        pages = allocator.allocate_adapter(
            self.pool.pages_for_lora_elems(total_elems(specs)), adapter_id
        )
        while True:
            try:
                return pages, place_rows(specs, pages, page_elems)
            except DoesNotFit:
                try:  # scattered pages lose room at boundaries: one more page
                    pages = sorted(pages + allocator.allocate_adapter(1, adapter_id))
                except OutOfPages:
                    allocator.free(pages)
                    raise
