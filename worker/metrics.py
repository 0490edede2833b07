"""The worker's Prometheus metrics, on a registry owned by the process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "lorapool_worker_jobs", "Jobs ended, by outcome", ["outcome"], registry=r
        )
        self.tokens = Counter("lorapool_worker_output_tokens", "Tokens generated", registry=r)
        self.batch_size = Histogram(
            "lorapool_worker_batch_size", "Sequences running per step", buckets=BATCH, registry=r
        )
        self.step_seconds = Histogram(
            "lorapool_worker_step_seconds", "Engine step time", buckets=SECONDS, registry=r
        )
        self.queue_seconds = Histogram(
            "lorapool_worker_queue_seconds", "Enqueue to admission", buckets=SECONDS, registry=r
        )
        self.adapters_resident = Gauge(
            "lorapool_worker_adapters_resident", "Adapters loaded in the engine", registry=r
        )
        self.adapter_load_seconds = Histogram(
            "lorapool_worker_adapter_load_seconds",
            "Fetching an adapter blob",
            buckets=SECONDS,
            registry=r,
        )
        self.free_pages = Gauge(
            "lorapool_worker_free_pages", "Free pages in the page pool", registry=r
        )
        self.active = Gauge(
            "lorapool_worker_active_jobs", "Jobs claimed and not yet acked", registry=r
        )

    def step(self, seconds: float, running: int) -> None:
        self.step_seconds.observe(seconds)
        self.batch_size.observe(max(running, 1))

    def tick(self, active: int, free_pages: int) -> None:
        self.active.set(active)
        self.free_pages.set(free_pages)
