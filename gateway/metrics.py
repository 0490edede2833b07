"""The gateway's Prometheus metrics, on a registry owned by the process (not the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorapool_gateway_requests", "RPCs received", ["method"], registry=r
        )
        self.errors = Counter(
            "lorapool_gateway_errors", "RPCs ended with an error", ["code"], registry=r
        )
        self.output_tokens = Counter(
            "lorapool_gateway_output_tokens", "Tokens streamed", registry=r
        )
        self.ttft = Histogram(
            "lorapool_gateway_time_to_first_token_seconds",
            "Request to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "lorapool_gateway_inter_token_latency_seconds",
            "Between token messages",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "lorapool_queue_depth", "Jobs queued or running per adapter", ["adapter"], registry=r
        )
        self.redis_up = Gauge("lorapool_gateway_redis_up", "1 while Redis answers", registry=r)

    def set_depths(self, depths: dict[str, int]) -> None:
        self.queue_depth.clear()
        for adapter, depth in depths.items():
            self.queue_depth.labels(adapter=adapter).set(depth)
