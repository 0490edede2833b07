"""Page ownership: one free list and one budget for KV blocks and adapter weights.

Pure-Python bookkeeping over integer page ids, testable without a GPU. Every page has a
kind (FREE, KV, ADAPTER), an owner (a sequence or adapter id) and a pin count. KV pages
are handed out one by one from the top of the id range; adapters take a contiguous run
first-fit from the bottom when one exists (so their matrices are plain views of the
buffer), else the lowest free pages. Allocation is all-or-nothing.
"""

from __future__ import annotations

import bisect
import enum
from collections import Counter
from dataclasses import dataclass


class PageKind(enum.Enum):
    FREE = "free"
    KV = "kv"
    ADAPTER = "adapter"


class OutOfPages(RuntimeError):
    """Fewer free pages than requested; nothing was allocated."""


@dataclass(frozen=True)
class PoolCounts:
    total: int
    free: int
    kv: int
    adapter: int
    pinned: int
    largest_free_run: int


class PageAllocator:
    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError("num_pages must be positive")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages))  # sorted ascending
        self._kind = [PageKind.FREE] * num_pages
        self._owner: list[str | None] = [None] * num_pages
        self._pins = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def kind(self, page: int) -> PageKind:
        return self._kind[page]

    def owner(self, page: int) -> str | None:
        return self._owner[page]

    def pins(self, page: int) -> int:
        return self._pins[page]

    def allocate_kv(self, count: int, owner: str) -> list[int]:
        """`count` pages from the top of the free list (KV blocks), or OutOfPages."""
        self._check(count)
        pages = self._free[len(self._free) - count :][::-1]
        del self._free[len(self._free) - count :]
        return self._take(pages, PageKind.KV, owner)

    def allocate_adapter(self, count: int, owner: str) -> list[int]:
        """A contiguous run (first fit from the bottom) if one exists, else the lowest pages."""
        self._check(count)
        start = self._first_run(count)
        if start is None:
            pages = self._free[:count]
            del self._free[:count]
        else:
            i = bisect.bisect_left(self._free, start)
            pages = self._free[i : i + count]
            del self._free[i : i + count]
        return self._take(pages, PageKind.ADAPTER, owner)

    def free(self, pages: list[int]) -> None:
        self._check_ids(pages)
        for page in pages:
            if self._kind[page] is PageKind.FREE:
                raise ValueError(f"page {page} is not allocated")
            if self._pins[page]:
                raise ValueError(f"page {page} is pinned")
        for page in pages:
            self._kind[page], self._owner[page] = PageKind.FREE, None
            bisect.insort(self._free, page)

    def pin(self, pages: list[int]) -> None:
        self._check_ids(pages)
        for page in pages:
            if self._kind[page] is PageKind.FREE:
                raise ValueError(f"page {page} is free; only allocated pages can be pinned")
            self._pins[page] += 1

    def unpin(self, pages: list[int]) -> None:
        self._check_ids(pages)
        for page in pages:
            if self._pins[page] == 0:
                raise ValueError(f"page {page} is not pinned")
            self._pins[page] -= 1

    def counts(self) -> PoolCounts:
        kinds = Counter(self._kind)
        return PoolCounts(
            total=self.num_pages,
            free=kinds[PageKind.FREE],
            kv=kinds[PageKind.KV],
            adapter=kinds[PageKind.ADAPTER],
            pinned=sum(1 for p in self._pins if p),
            largest_free_run=self._largest_run(),
        )

    def _check(self, count: int) -> None:
        if count < 0:
            raise ValueError("count must be >= 0")
        if count > len(self._free):
            raise OutOfPages(f"need {count} pages, {len(self._free)} free")

    def _check_ids(self, pages: list[int]) -> None:
        bad = [p for p in pages if not 0 <= p < self.num_pages]
        if bad:
            raise ValueError(f"no such pages: {bad[:5]} (the pool has {self.num_pages})")

    def _take(self, pages: list[int], kind: PageKind, owner: str) -> list[int]:
        for page in pages:
            self._kind[page], self._owner[page] = kind, owner
        return pages

    def _first_run(self, count: int) -> int | None:
        """Lowest page starting `count` consecutive free pages."""
        if count == 0:
            return None
        run_start, run = -1, 0
        previous = -2
        for page in self._free:
            run = run + 1 if page == previous + 1 else 1
            if run == 1:
                run_start = page
            if run == count:
                return run_start
            previous = page
        return None

    def _largest_run(self) -> int:
        best = run = 0
        previous = -2
        for page in self._free:
            run = run + 1 if page == previous + 1 else 1
            best = max(best, run)
            previous = page
        return best
