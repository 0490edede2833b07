"""Fixtures for the serving tests: a private Redis, flushed before every test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.serving.redis_proc import RedisProcess


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    proc = RedisProcess(Path(tmp_path_factory.mktemp("redis")))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_proc: RedisProcess) -> str:
    if redis_proc.proc is None:
        redis_proc.start()
    redis.Redis.from_url(redis_proc.url).flushall()
    return redis_proc.url
