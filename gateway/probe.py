"""A background probe: Redis reachability drives the health status and the depth gauges."""

from __future__ import annotations

import asyncio
import logging

import redis
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2

from broker.queue import Producer
from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

SERVICES = ("", "lorapool.v1.Generation", "lorapool.v1.Admin")


class RedisProbe:
    def __init__(
        self,
        client: aioredis.Redis,
        producer: Producer,
        health_servicer: health.aio.HealthServicer,
        metrics: GatewayMetrics,
        interval_s: float,
    ) -> None:
        self._client = client
        self._producer = producer
        self._health = health_servicer
        self._metrics = metrics
        self._interval_s = interval_s
        self.up = False
        self._stopping = False

    async def check(self) -> bool:
        try:
            await asyncio.wait_for(self._client.ping(), self._interval_s * 2)
            self._metrics.set_depths(await self._producer.depths())
        except (redis.RedisError, TimeoutError, OSError) as exc:
            if self.up:
                log.warning("Redis unreachable: %s", exc)
            await self._set(False)
            return False
        if not self.up:
            log.info("Redis reachable")
        await self._set(True)
        return True

    async def _set(self, up: bool) -> None:
        self.up = up
        self._metrics.redis_up.set(1 if up else 0)
        if self._stopping:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if up
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in SERVICES:
            await self._health.set(service, status)

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self._interval_s)

    async def shutting_down(self) -> None:
        self._stopping = True
        await self._health.enter_graceful_shutdown()
