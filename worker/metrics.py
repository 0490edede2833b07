"""The worker's Prometheus metrics, on a registry owned by the process.

Per-adapter series (`lorapool_worker_adapter_*`) carry `adapter` = `name:version` (`base`
for the base model; `digest:<12 hex>` for a job from a gateway that sent no name), with at
most `top_adapters` adapters by recent volume labelled by name and the rest as `other`.
Outcomes: `stop`, `length`, `cancelled` (the client), `abandoned` (nobody read the results),
`deadline_exceeded`, `lost` (Redis forgot the request), or a failure's status code in lower
case (`failed_precondition`, `invalid_argument`, `internal`, `unavailable`).
"""

from __future__ import annotations

from collections import Counter as Counts
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.engine import EngineStats
from worker.pool_metrics import PoolMetrics

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BASE = "base"
OTHER = "other"


class TopAdapters:
    """Which adapters get their own label value: at most `top_n`; the rest share `other`.

    Counts are per ended job and halve every `decay_every` jobs, so "top" follows recent
    traffic and the table of counts stays small. An adapter enters when there is room, or
    when its count is more than twice the weakest member's (hysteresis: adapters of equal
    traffic do not swap places on every job); the one it displaces goes to `on_evict`, so
    its series can be removed. The base model is always its own series, outside the cap.
    The same rule as the gateway's (gateway/labels.py).
    """

    def __init__(
        self, top_n: int, on_evict: Callable[[str], None], decay_every: int = 10_000
    ) -> None:
        if top_n < 0:
            raise ValueError(f"top_n must be >= 0, got {top_n}")
        self._top_n = top_n
        self._on_evict = on_evict
        self._decay_every = decay_every
        self._counts: Counts[str] = Counts()
        self._seen = 0
        self.top: set[str] = set()

    def label(self, adapter: str) -> str:
        """The label value for `adapter` now (admitted at once while there is room)."""
        if adapter == BASE or adapter in self.top:
            return adapter
        if len(self.top) < self._top_n:
            self.top.add(adapter)
            return adapter
        return OTHER

    def count(self, adapter: str) -> str:
        """Count one ended job for `adapter`; its label value (it may displace the weakest)."""
        if adapter == BASE:
            return BASE
        self._counts[adapter] += 1
        self._decay()
        value = self.label(adapter)
        if value != OTHER or not self.top:
            return value
        weakest = min(self.top, key=lambda a: (self._counts[a], a))
        if self._counts[adapter] <= 2 * self._counts[weakest]:
            return OTHER
        self.top.discard(weakest)
        self._on_evict(weakest)
        self.top.add(adapter)
        return adapter

    def _decay(self) -> None:
        self._seen += 1
        if self._seen < self._decay_every:
            return
        self._seen = 0
        for key in list(self._counts):
            self._counts[key] //= 2
            if self._counts[key] == 0 and key not in self.top:
                del self._counts[key]


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, top_adapters: int = 50) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.pool = PoolMetrics(r)
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
        self.reclaimed = Counter(
            "lorapool_worker_reclaimed_jobs", "Jobs taken over from dead workers", registry=r
        )
        self.cache_bytes = Gauge(
            "lorapool_worker_adapter_cache_bytes", "Adapter blobs on local disk", registry=r
        )
        self.cache_evictions = Counter(
            "lorapool_worker_adapter_cache_evictions",
            "Adapter blobs evicted from the local disk cache",
            registry=r,
        )
        self.base_model_bytes = Gauge(
            "lorapool_worker_base_model_bytes",
            "Bytes of the base model's weights on the device, by how its projections are stored",
            ["quantization"],  # none, nf4, fp4 or int8
            registry=r,
        )
        self._per_adapter(r)
        self.adapters = TopAdapters(top_adapters, self._forget_adapter)

    def _per_adapter(self, r: CollectorRegistry) -> None:
        self.adapter_jobs = Counter(
            "lorapool_worker_adapter_jobs",
            "Jobs ended, by adapter and outcome",
            ["adapter", "outcome"],
            registry=r,
        )
        self.adapter_tokens = Counter(
            "lorapool_worker_adapter_output_tokens",
            "Tokens generated, by adapter",
            ["adapter"],
            registry=r,
        )
        self.adapter_ttft = Histogram(
            "lorapool_worker_adapter_time_to_first_token_seconds",
            "Admission into the engine to the first token, by adapter",
            ["adapter"],
            buckets=SECONDS,
            registry=r,
        )
        self.adapter_queue_seconds = Histogram(
            "lorapool_worker_adapter_queue_seconds",
            "Enqueue to admission into the engine, by adapter",
            ["adapter"],
            buckets=SECONDS,
            registry=r,
        )

    def _forget_adapter(self, adapter: str) -> None:
        for metric in (
            self.adapter_jobs,
            self.adapter_tokens,
            self.adapter_ttft,
            self.adapter_queue_seconds,
        ):
            metric.remove_by_labels({"adapter": adapter})

    def job_ended(self, adapter: str, outcome: str) -> None:
        self.jobs.labels(outcome=outcome).inc()
        self.adapter_jobs.labels(adapter=self.adapters.count(adapter), outcome=outcome).inc()

    def admitted(self, adapter: str, queue_seconds: float) -> None:
        self.queue_seconds.observe(queue_seconds)
        self.adapter_queue_seconds.labels(adapter=self.adapters.label(adapter)).observe(
            queue_seconds
        )

    def first_token(self, adapter: str, seconds: float) -> None:
        self.adapter_ttft.labels(adapter=self.adapters.label(adapter)).observe(seconds)

    def output_tokens(self, adapter: str, n: int) -> None:
        self.tokens.inc(n)
        self.adapter_tokens.labels(adapter=self.adapters.label(adapter)).inc(n)

    def cache(self, held: int, used_bytes: int, evicted: int) -> None:
        self.adapters_resident.set(held)
        self.cache_bytes.set(used_bytes)
        self.cache_evictions.inc(evicted)

    def step(self, seconds: float, running: int) -> None:
        self.step_seconds.observe(seconds)
        self.batch_size.observe(max(running, 1))

    def tick(self, active: int, stats: EngineStats) -> None:
        self.active.set(active)
        self.free_pages.set(stats.free_pages)
        self.pool.update(stats)
