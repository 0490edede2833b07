"""The gateway's Prometheus metrics, on a registry owned by the process (not the global one).

Per-adapter series carry `adapter` = `name:version` (`base` for the base model, `other`
past the top-N cap, see gateway/labels.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.labels import OTHER, AdapterLabels

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class PoolState(Protocol):
    """What a bounded thread pool reports (gateway/bounded.py)."""

    @property
    def in_flight(self) -> int: ...

    @property
    def saturated_total(self) -> int: ...


class PoolCollector(Collector):
    """Reads a pool's counters at scrape time."""

    def __init__(self, name: str, pool: PoolState) -> None:
        self._name = name
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        prefix = f"lorapool_gateway_{self._name}_pool"
        saturated = CounterMetricFamily(
            f"{prefix}_saturated", "Calls refused because the pool was full"
        )
        saturated.add_metric([], self._pool.saturated_total)
        in_flight = GaugeMetricFamily(f"{prefix}_in_flight", "Calls running or waiting in the pool")
        in_flight.add_metric([], self._pool.in_flight)
        yield saturated
        yield in_flight


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, top_adapters: int = 50) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorapool_gateway_requests", "RPCs received", ["method"], registry=r
        )
        self.errors = Counter(
            "lorapool_gateway_errors", "RPCs ended with an error", ["code"], registry=r
        )
        self.auth_refusals = Counter(
            "lorapool_gateway_auth_refusals", "Calls refused by token auth", ["code"], registry=r
        )
        self._adapter_series(r)
        self.queue_depth = Gauge(
            "lorapool_queue_depth", "Jobs queued or running per adapter", ["adapter"], registry=r
        )
        self.redis_up = Gauge("lorapool_gateway_redis_up", "1 while Redis answers", registry=r)
        self.live_workers = Gauge(
            "lorapool_gateway_live_workers", "Workers with a live heartbeat", registry=r
        )
        self.cancel_retries = Counter(
            "lorapool_gateway_cancel_retries", "Cancels that failed and were retried", registry=r
        )
        self.task_errors = Counter(
            "lorapool_gateway_background_task_errors", "Background tasks that failed", registry=r
        )
        self._top_adapters = top_adapters
        self.adapters = AdapterLabels(top_adapters, self._forget_adapter)

    def _adapter_series(self, r: CollectorRegistry) -> None:
        """The series labelled by adapter (name:version, base, other)."""
        self._outcome_names: set[str] = set()
        self.outcomes = Counter(
            "lorapool_gateway_adapter_requests",
            "Generate requests by adapter and outcome (ok or the status code, lower case)",
            ["adapter", "outcome"],
            registry=r,
        )
        self.output_tokens = Counter(
            "lorapool_gateway_output_tokens", "Tokens streamed", ["adapter"], registry=r
        )
        self.ttft = Histogram(
            "lorapool_gateway_time_to_first_token_seconds",
            "Request to first token",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "lorapool_gateway_inter_token_latency_seconds",
            "Between token messages",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "lorapool_gateway_queue_wait_seconds",
            "Enqueue to admission into a worker's engine (as the worker reports it)",
            ["adapter"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )

    def outcome(self, adapter: str, outcome: str) -> None:
        self._outcome_names.add(outcome)
        self.outcomes.labels(adapter=adapter, outcome=outcome).inc()

    def _forget_adapter(self, adapter: str) -> None:
        for metric in (self.output_tokens, self.ttft, self.itl, self.queue_wait):
            metric.remove(adapter)
        for outcome in self._outcome_names:
            self.outcomes.remove(adapter, outcome)

    def watch_pool(self, name: str, pool: PoolState) -> None:
        self.registry.register(PoolCollector(name, pool))

    def set_depths(self, depths: dict[str, int]) -> None:
        """One series per queue (its adapter digest) for the `top_adapters` deepest queues;
        the rest add up under `other`, so thousands of adapters make a bounded label set."""
        self.queue_depth.clear()
        ranked = sorted(depths.items(), key=lambda item: (-item[1], item[0]))
        for adapter, depth in ranked[: self._top_adapters]:
            self.queue_depth.labels(adapter=adapter).set(depth)
        rest = ranked[self._top_adapters :]
        if rest:
            self.queue_depth.labels(adapter=OTHER).set(sum(depth for _, depth in rest))
