"""The unified page pool: fixed-size pages named by integer ids, one free list.

Pure-Python bookkeeping, testable without a GPU. KV blocks take pages today;
adapter weight slices will take pages from the same free list and budget, so one
number says how full the device is.
"""

from __future__ import annotations

from collections import deque


class OutOfPages(RuntimeError):
    """Fewer free pages than requested; nothing was allocated."""


class PagePool:
    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError("num_pages must be positive")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        """All `count` pages or none (OutOfPages)."""
        if count > len(self._free):
            raise OutOfPages(f"need {count} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(count)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            if page not in self._used:
                raise ValueError(f"page {page} is not allocated")
            self._used.remove(page)
            self._free.append(page)
