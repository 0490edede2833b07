"""The host tier: adapters parsed into host memory (pinned on CUDA), LRU within a byte budget.

Loads run on background threads; the step loop only asks whether an adapter is ready
(`get`) and never waits. A load that fails keeps its error, so every request naming
that adapter fails with the same message and nothing else does.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from worker.lora.adapter import AdapterLoadError, HostAdapter

Loader = Callable[[str, Path], HostAdapter]
log = logging.getLogger(__name__)


@dataclass
class HostStats:
    hits: int = 0  # asked for a ready adapter
    misses: int = 0  # asked for one that had to be (or was being) loaded
    loads: int = 0
    failures: int = 0
    evictions: int = 0
    load_seconds: float = 0.0  # total time of finished loads


class HostCache:
    def __init__(self, load: Loader, budget_bytes: int, threads: int = 2) -> None:
        self._load = load
        self.budget_bytes = budget_bytes
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="adapter-load")
        self._ready: OrderedDict[str, HostAdapter] = OrderedDict()
        self._loading: dict[str, Future[tuple[HostAdapter, float]]] = {}
        self._errors: dict[str, str] = {}
        self.stats = HostStats()

    @property
    def num_ready(self) -> int:
        return len(self._ready)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._ready.values())

    def request(self, adapter_id: str, source: Path) -> None:
        """Start loading unless the adapter is ready, loading, or failed."""
        if adapter_id in self._ready or adapter_id in self._loading or adapter_id in self._errors:
            return
        self._loading[adapter_id] = self._pool.submit(self._timed, adapter_id, source)

    def get(self, adapter_id: str) -> HostAdapter | None:
        """The ready adapter (counted as a hit), or None while it loads (a miss)."""
        self._collect(adapter_id)
        adapter = self._ready.get(adapter_id)
        if adapter is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self._ready.move_to_end(adapter_id)
        return adapter

    def peek(self, adapter_id: str) -> HostAdapter | None:
        """Like get, without counting or reordering."""
        self._collect(adapter_id)
        return self._ready.get(adapter_id)

    def loading(self, adapter_id: str) -> bool:
        self._collect(adapter_id)
        return adapter_id in self._loading

    def error(self, adapter_id: str) -> str | None:
        self._collect(adapter_id)
        return self._errors.get(adapter_id)

    def drop(self, adapter_id: str) -> None:
        """Forget the adapter (a new source replaces it); a load in flight is discarded."""
        self._ready.pop(adapter_id, None)
        self._errors.pop(adapter_id, None)
        future = self._loading.pop(adapter_id, None)
        if future is not None:
            future.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _timed(self, adapter_id: str, source: Path) -> tuple[HostAdapter, float]:
        t0 = time.perf_counter()
        adapter = self._load(adapter_id, source)
        return adapter, time.perf_counter() - t0

    def _collect(self, adapter_id: str) -> None:
        future = self._loading.get(adapter_id)
        if future is None or not future.done():
            return
        del self._loading[adapter_id]
        try:
            adapter, seconds = future.result()
        except AdapterLoadError as exc:
            self._errors[adapter_id] = str(exc)
            self.stats.failures += 1
            return
        except Exception as exc:  # noqa: BLE001 (any failure to load fails this adapter only)
            log.exception("loading adapter %s failed", adapter_id)
            self._errors[adapter_id] = f"adapter could not be loaded: {exc!r}"
            self.stats.failures += 1
            return
        self.stats.loads += 1
        self.stats.load_seconds += seconds
        self._ready[adapter_id] = adapter
        self._trim(keep=adapter_id)

    def _trim(self, keep: str) -> None:
        total = self.nbytes
        for adapter_id in list(self._ready):
            if total <= self.budget_bytes:
                return
            if adapter_id != keep:
                total -= self._ready.pop(adapter_id).nbytes
                self.stats.evictions += 1
