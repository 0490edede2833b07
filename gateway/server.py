"""Assemble and run the gateway: servicers, interceptor, health, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from broker import keys
from broker.queue import Producer
from broker.results import Reader
from gateway.admin import AdminServicer
from gateway.auth import TokenAuth
from gateway.bounded import BoundedExecutor
from gateway.generation import GenerationDeps, GenerationServicer
from gateway.metrics import GatewayMetrics
from gateway.probe import RedisProbe
from gateway.registry import CachedResolver, Registry
from gateway.relay import Relay
from gateway.settings import GatewaySettings
from gateway.tasks import BackgroundTasks
from protos.lorapool.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)


TASKS_GRACE_S = 2.0  # background work (cancels being retried) left at shutdown gets this long


@dataclass
class Gateway:
    server: grpc.aio.Server
    probe: RedisProbe
    tasks: BackgroundTasks
    port: int
    grace_s: float
    probe_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        await self.probe.check()
        self.probe_task = self.tasks.spawn(self.probe.run(), "redis-probe")

    async def stop(self) -> None:
        """Stop accepting, give open streams `grace_s` to finish, then close."""
        await self.probe.shutting_down()
        await self.server.stop(self.grace_s)
        if self.probe_task is not None:
            self.probe_task.cancel()
        await self.tasks.close(TASKS_GRACE_S)


def _options(s: GatewaySettings) -> list[tuple[str, int]]:
    keepalive_ms = int(s.keepalive_s * 1000)
    return [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def _credentials(s: GatewaySettings) -> grpc.ServerCredentials | None:
    if s.tls_cert is None or s.tls_key is None:
        return None
    pair = [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())]
    if s.tls_client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair, root_certificates=s.tls_client_ca.read_bytes(), require_client_auth=True
    )


def build(s: GatewaySettings, registry: Registry, metrics: GatewayMetrics) -> Gateway:
    client = keys.async_client(s.redis_url, s.redis_timeout_s)
    producer = Producer(client, s.queue_limits)
    health_servicer = health.aio.HealthServicer()
    probe = RedisProbe(
        client, producer, health_servicer, metrics, s.probe_interval_s, s.redis_timeout_s
    )
    resolver = CachedResolver(registry, s.registry_cache_s, s.registry_timeout_s)
    tasks = BackgroundTasks(on_error=metrics.task_errors.inc)
    auth = TokenAuth(s.api_tokens, s.admin_tokens, _count_refusal(metrics))
    server = grpc.aio.server(interceptors=[auth], options=_options(s))
    pool = getattr(registry, "pool", None)
    if isinstance(pool, BoundedExecutor):
        metrics.watch_pool("registry", pool)
    deps = GenerationDeps(
        producer=producer,
        relay=Relay(Reader(client), producer, probe, s.no_worker_grace_s),
        resolver=resolver,
        registry=registry,
        probe=probe,
        metrics=metrics,
        tasks=tasks,
        limits=s.request_limits,
        max_request_s=s.max_request_s,
        no_worker_grace_s=s.no_worker_grace_s,
        result_ttl_s=s.queue_limits.result_ttl_s,
    )
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(deps), server)
    admin = AdminServicer(registry, resolver, metrics, s.upload_limits)
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
        admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    credentials = _credentials(s)
    if credentials is None:
        port = server.add_insecure_port(s.listen)
    else:
        port = server.add_secure_port(s.listen, credentials)
    return Gateway(server, probe, tasks, port, s.grace_s)


def _count_refusal(metrics: GatewayMetrics) -> Callable[[grpc.StatusCode], None]:
    def count(code: grpc.StatusCode) -> None:
        metrics.auth_refusals.labels(code=code.name).inc()

    return count


async def serve(s: GatewaySettings, registry: Registry) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    metrics = GatewayMetrics(top_adapters=s.top_adapters)
    if s.metrics_port:
        start_http_server(s.metrics_port, addr=s.metrics_addr, registry=metrics.registry)
    gateway = build(s, registry, metrics)
    await gateway.start()
    log.info("gateway listening on %s (port %d)", s.listen, gateway.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down (grace %.0fs)", s.grace_s)
    await gateway.stop()
