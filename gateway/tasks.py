"""Background work the gateway starts and must not lose: tracked tasks and retried calls.

Every task is kept in a set until it ends, and its end is inspected: an exception is
logged and counted (never "Task exception was never retrieved"). `close` gives the tasks
left a moment on shutdown, then cancels them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import redis

log = logging.getLogger(__name__)

# What a retried call may fail with and still be worth retrying (Redis down or slow).
TRANSIENT: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)


class BackgroundTasks:
    def __init__(self, on_error: Callable[[], None] | None = None) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_error = on_error

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved: asyncio will not complain about it
        if exc is not None:
            log.error("background task %s failed: %r", task.get_name(), exc, exc_info=exc)
            if self._on_error is not None:
                self._on_error()

    async def close(self, grace_s: float) -> None:
        """Wait up to `grace_s` for the tasks left, then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


async def retry_until(
    call: Callable[[], Awaitable[object]],
    until: float,
    on_retry: Callable[[BaseException], None],
    first_delay_s: float = 0.1,
    max_delay_s: float = 2.0,
) -> bool:
    """Call until it succeeds or monotonic time `until` passes; True when it succeeded.

    Transient failures (Redis errors, timeouts) are retried with exponential backoff;
    anything else propagates.
    """
    delay = first_delay_s
    while True:
        try:
            await call()
            return True
        except TRANSIENT as exc:
            if time.monotonic() + delay > until:
                log.warning("giving up after retries: %r", exc)
                return False
            on_retry(exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay_s)
