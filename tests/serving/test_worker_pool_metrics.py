"""Engine.stats() as Prometheus series: every field kind (counts, ratios, per-adapter maps)."""

from __future__ import annotations

from dataclasses import fields

from prometheus_client import CollectorRegistry

from worker.engine import EngineStats
from worker.pool_metrics import PoolMetrics


def stats(**values: object) -> EngineStats:
    base: dict[str, object] = {f.name: 0 for f in fields(EngineStats)}
    base["spec_by_adapter"] = {}
    return EngineStats(**(base | values))  # type: ignore[arg-type]


def test_counters_follow_the_engines_totals_and_maps_are_ignored() -> None:
    registry = CollectorRegistry()
    metrics = PoolMetrics(registry)
    metrics.update(stats(device_misses=3, spec_proposed=10, spec_accepted=7, kv_pages=5))
    metrics.update(stats(device_misses=5, spec_proposed=16, spec_accepted=12, kv_pages=2))

    def value(name: str, **labels: str) -> float:
        got = registry.get_sample_value(name, labels)
        assert got is not None, name
        return got

    assert value("lorapool_worker_adapter_tier_events_total", tier="device", event="miss") == 5
    assert value("lorapool_worker_speculative_tokens_total", kind="accepted") == 12
    assert value("lorapool_worker_pool_pages", kind="kv") == 2
