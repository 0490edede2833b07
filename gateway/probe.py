"""A background probe: Redis reachability and live workers drive health and the gauges.

Health per service:
    ""                        SERVING while Redis answers
    lorapool.v1.Admin         SERVING while Redis answers
    lorapool.v1.Generation    SERVING while Redis answers AND at least one worker heartbeats
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2

from broker.queue import Producer
from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

GENERATION = "lorapool.v1.Generation"
REDIS_SERVICES = ("", "lorapool.v1.Admin")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RedisProbe:
    def __init__(
        self,
        client: aioredis.Redis,
        producer: Producer,
        health_servicer: health.aio.HealthServicer,
        metrics: GatewayMetrics,
        interval_s: float,
        timeout_s: float,  # a probe slower than this counts as Redis down
    ) -> None:
        self._client = client
        self._producer = producer
        self._health = health_servicer
        self._metrics = metrics
        self._interval_s = interval_s
        # Never shorter than the Redis client's own timeout: a slow answer on a loaded host
        # is not an outage (a short probe interval once refused requests on a busy CI host).
        self._timeout_s = max(timeout_s, interval_s * 2)
        self.up = False
        self.live_workers = 0
        self._zero_since: float | None = None  # monotonic time the count was first seen at 0
        self._stopping = False

    def workerless(self, grace_s: float) -> bool:
        """True when probes have counted no live worker for at least `grace_s` seconds.

        Only probes that reached Redis move this: an outage neither starts nor ends it.
        """
        return self._zero_since is not None and time.monotonic() - self._zero_since >= grace_s

    async def check(self) -> bool:
        try:
            live = await asyncio.wait_for(self._producer.live_workers(), self._timeout_s)
            self._metrics.set_depths(await self._producer.depths())
        except (redis.RedisError, TimeoutError, OSError) as exc:
            if self.up:
                log.warning("Redis unreachable: %s", exc)
            await self._set(False)
            return False
        if not self.up:
            log.info("Redis reachable")
        self._count(live)
        await self._set(True)
        return True

    def _count(self, live: int) -> None:
        if live == 0 and self._zero_since is None:
            self._zero_since = time.monotonic()
            log.warning("no live worker")
        elif live > 0 and self._zero_since is not None:
            self._zero_since = None
            log.info("%d live worker(s)", live)
        self.live_workers = live
        self._metrics.live_workers.set(live)

    async def _set(self, up: bool) -> None:
        self.up = up
        self._metrics.redis_up.set(1 if up else 0)
        if self._stopping:
            return
        for service in REDIS_SERVICES:
            await self._health.set(service, SERVING if up else NOT_SERVING)
        generating = up and self.live_workers > 0
        await self._health.set(GENERATION, SERVING if generating else NOT_SERVING)

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self._interval_s)

    async def shutting_down(self) -> None:
        self._stopping = True
        await self._health.enter_graceful_shutdown()
