"""A bounded thread pool for blocking calls made from the event loop.

`asyncio.to_thread` uses the loop's default executor: a call that outlives the caller's
`wait_for` (a stalled database) keeps its thread, and new calls queue behind it without
bound. Here a fixed number of threads serve the calls and at most `max_pending` calls may
be running or queued at once; past that a call is refused at once (`PoolSaturated`) and
counted, instead of waiting for a thread that may never come back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class PoolSaturated(Exception):
    """Every thread is busy and the queue is full."""


class BoundedExecutor:
    def __init__(self, name: str, max_threads: int, max_pending: int) -> None:
        if max_threads < 1 or max_pending < max_threads:
            raise ValueError("need max_threads >= 1 and max_pending >= max_threads")
        self.name = name
        self.max_pending = max_pending
        self._pool = concurrent.futures.ThreadPoolExecutor(max_threads, f"lorapool-{name}")
        self._lock = threading.Lock()
        self._in_flight = 0  # submitted and not yet returned
        self._saturated = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def saturated_total(self) -> int:
        return self._saturated

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on a pool thread. A caller that stops waiting (timeout, cancel)
        leaves the call counted until its thread really returns."""
        with self._lock:
            full = self._in_flight >= self.max_pending
            if full:
                self._saturated += 1
            else:
                self._in_flight += 1
        if full:
            log.warning("%s pool saturated (%d calls in flight)", self.name, self.max_pending)
            raise PoolSaturated(f"{self.name} busy ({self.max_pending} calls in flight): retry")
        try:
            future = self._pool.submit(functools.partial(fn, *args))
        except RuntimeError as exc:  # shut down
            self._finished(None)
            raise PoolSaturated(f"{self.name} is shutting down") from exc
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    def _finished(self, _future: concurrent.futures.Future[T] | None) -> None:
        with self._lock:
            self._in_flight -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
