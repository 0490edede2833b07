"""Adapters the engine knows: registered sources, loaded weights (LRU), and load errors.

An adapter is registered by id with a source path and loaded on first use. At most
`capacity` adapters stay loaded; the least recently used one that no running
sequence pins is dropped first. A source that fails to load keeps its error, so
every request naming it fails with the same clear message and nothing else does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from worker.lora.adapter import AdapterLoadError, LoraAdapter
from worker.lora.stacks import AdapterStacks

Loader = Callable[[str, Path], LoraAdapter]


class AdapterManager:
    def __init__(self, loader: Loader, capacity: int) -> None:
        self.loader = loader
        self.capacity = capacity
        self.sources: dict[str, Path] = {}
        self.loaded: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.errors: dict[str, str] = {}
        self.stacks = AdapterStacks(capacity)

    def register(self, adapter_id: str, source: Path) -> None:
        if self.sources.get(adapter_id) != source:
            self.sources[adapter_id] = source
            if adapter_id in self.loaded:
                self.stacks.remove(self.loaded.pop(adapter_id))
            self.errors.pop(adapter_id, None)

    def knows(self, adapter_id: str) -> bool:
        return adapter_id in self.sources

    def ensure(self, adapter_id: str, pinned: set[str]) -> LoraAdapter:
        """The loaded adapter (loading it if needed); raises AdapterLoadError."""
        if adapter_id in self.loaded:
            self.loaded.move_to_end(adapter_id)
            return self.loaded[adapter_id]
        if adapter_id in self.errors:
            raise AdapterLoadError(self.errors[adapter_id])
        try:
            adapter = self.loader(adapter_id, self.sources[adapter_id])
        except AdapterLoadError as exc:
            self.errors[adapter_id] = str(exc)
            raise
        self._evict(pinned)
        self.stacks.place(adapter)
        self.loaded[adapter_id] = adapter
        return adapter

    def get(self, adapter_id: str) -> LoraAdapter:
        return self.loaded[adapter_id]

    def _evict(self, pinned: set[str]) -> None:
        for adapter_id in list(self.loaded):
            if len(self.loaded) < self.capacity:
                return
            if adapter_id not in pinned:
                self.stacks.remove(self.loaded.pop(adapter_id))
