"""The page pool, the adapter tiers and speculation as Prometheus series (Engine.stats()).

Gauges for the pool's state now; counters for what happened, fed by the difference
between two snapshots of the engine's running totals.
"""

from __future__ import annotations

from dataclasses import asdict

from prometheus_client import CollectorRegistry, Counter, Gauge

from worker.engine import EngineStats

# EngineStats field → (tier label, event label) of lorapool_worker_adapter_tier_events_total.
EVENTS = {
    "device_hits": ("device", "hit"),
    "device_misses": ("device", "miss"),
    "device_evictions": ("device", "eviction"),
    "host_hits": ("host", "hit"),
    "host_misses": ("host", "miss"),
    "host_loads": ("host", "load"),
    "host_evictions": ("host", "eviction"),
    "prefetched": ("host", "prefetch"),
    "prefetched_in_time": ("host", "prefetch_in_time"),
}
# EngineStats field → lorapool_worker_speculative_tokens_total{kind}
SPECULATIVE = {"spec_proposed": "proposed", "spec_accepted": "accepted"}
SECONDS = {"host_load_seconds": "host", "page_in_seconds": "device"}


class PoolMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.pages = Gauge(
            "lorapool_worker_pool_pages", "Page pool pages by kind", ["kind"], registry=r
        )
        self.largest_free_run = Gauge(
            "lorapool_worker_pool_largest_free_run", "Longest run of free pages", registry=r
        )
        self.padding = Gauge(
            "lorapool_worker_pool_adapter_padding_ratio",
            "Adapter page elements beyond the weights, over the weights",
            registry=r,
        )
        self.adapters = Gauge(
            "lorapool_worker_adapters_in_tier", "Adapters resident per tier", ["tier"], registry=r
        )
        self.events = Counter(
            "lorapool_worker_adapter_tier_events",
            "Hits, misses, loads, evictions and prefetches per tier",
            ["tier", "event"],
            registry=r,
        )
        self.load_seconds = Counter(
            "lorapool_worker_adapter_tier_load_seconds",
            "Time spent loading adapters into a tier (host: parse; device: page-in)",
            ["tier"],
            registry=r,
        )
        self.speculative = Counter(
            "lorapool_worker_speculative_tokens",
            "Draft tokens proposed and accepted",
            ["kind"],
            registry=r,
        )
        self.acceptance = Gauge(
            "lorapool_worker_speculative_acceptance_ratio", "Accepted / proposed", registry=r
        )
        self.tokens_per_step = Gauge(
            "lorapool_worker_speculative_tokens_per_step",
            "Tokens a sampling sequence gets per step (1: no speculation)",
            registry=r,
        )
        self._last: dict[str, float] = {}

    def update(self, stats: EngineStats) -> None:
        for kind, pages in (
            ("free", stats.free_pages),
            ("kv", stats.kv_pages),
            ("adapter", stats.adapter_pages),
        ):
            self.pages.labels(kind=kind).set(pages)
        self.largest_free_run.set(stats.largest_free_run)
        self.padding.set(stats.adapter_padding)
        self.adapters.labels(tier="device").set(stats.adapters_loaded)
        self.adapters.labels(tier="host").set(stats.adapters_on_host)
        numbers = asdict(stats).items()
        now = {k: float(v) for k, v in numbers if isinstance(v, int | float)}
        for field, (tier, event) in EVENTS.items():
            self.events.labels(tier=tier, event=event).inc(self._delta(now, field))
        for field, tier in SECONDS.items():
            self.load_seconds.labels(tier=tier).inc(self._delta(now, field))
        for field, kind in SPECULATIVE.items():
            self.speculative.labels(kind=kind).inc(self._delta(now, field))
        self.acceptance.set(stats.spec_acceptance_rate)
        self.tokens_per_step.set(stats.spec_tokens_per_step)
        self._last = now

    def _delta(self, now: dict[str, float], field: str) -> float:
        return max(now[field] - self._last.get(field, 0.0), 0.0)
