"""Prefetch: adapters of work queued behind a busy worker reach host memory before their turn.

A real engine (tiny random Llama) behind the real service loop and a private Redis: the
worker holds two long base-model jobs (max_active = 2), six jobs for six cold adapters
wait in Redis unclaimed. The service reads the broker's ready set, fetches those blobs
and starts their host loads; when the long jobs end, the cold adapters' jobs find them
in host memory (the engine's prefetched_in_time counter), and every job streams.
"""

from __future__ import annotations

import hashlib
from collections.abc import Set
from pathlib import Path

import redis

from adapter_store.basemodel import BaseModelSpec
from adapter_store.validation import validate_adapter_dir
from broker import keys
from broker.queue import Consumer
from broker.results import Publisher
from tests.adapter_store.builders import write_lora
from tests.serving.test_worker_fakes import ended, enqueue, outcome, wait_until
from tests.worker.conftest import save_tiny
from worker.config import EngineConfig, default_cache_dir
from worker.engine import Engine
from worker.metrics import WorkerMetrics
from worker.model.source import DEFAULT_MODEL, resolve_model_dir
from worker.service import ServiceSettings, WorkerService


class LocalBlobs:
    """Blob files by digest, each 'fetched' on its second ask (a fetch in flight first)."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self.asks: dict[str, int] = {}
        self.used_bytes = 0

    def get(self, digest: str) -> Path | None:
        self.asks[digest] = self.asks.get(digest, 0) + 1
        return self.paths[digest] if self.asks[digest] > 1 else None

    def trim(self, in_use: Set[str]) -> set[str]:
        return set()


def blobs_for(base: Path, root: Path, count: int) -> dict[str, Path]:
    spec = BaseModelSpec.from_hf_dir(base)
    out = {}
    for i in range(count):
        directory = write_lora(root / f"a{i}", spec, seed=i, r=4 + 4 * i)
        data = validate_adapter_dir(directory, spec, max_rank=64).encode()
        digest = hashlib.sha256(data).hexdigest()
        (root / f"{digest}.safetensors").write_bytes(data)
        out[digest] = root / f"{digest}.safetensors"
    return out


def test_cold_adapters_queued_behind_a_busy_worker_are_prefetched(
    redis_url: str, tmp_path: Path
) -> None:
    smollm2 = resolve_model_dir(DEFAULT_MODEL, default_cache_dir())
    base = save_tiny(tmp_path, smollm2, "llama")
    blobs = LocalBlobs(blobs_for(base, tmp_path / "blobs", 6))
    engine = Engine.from_config(EngineConfig(model=str(base), max_num_seqs=2))
    client = redis.Redis.from_url(redis_url)
    settings = ServiceSettings(max_active=2, claim_batch=2, max_wait_ms=60_000, idle_sleep_s=0)
    svc = WorkerService(
        engine,
        Consumer(client, "w", keys.Limits()),
        Publisher(client, keys.Limits(abandon_after_s=3600)),  # no gateway reads here
        blobs,
        settings,
        WorkerMetrics(),
    )
    enqueue(redis_url, "long1", max_tokens=60)
    enqueue(redis_url, "long2", max_tokens=60)
    cold = [f"cold{i}" for i in range(6)]
    for rid, digest in zip(cold, blobs.paths, strict=True):
        enqueue(redis_url, rid, digest=digest, max_tokens=4)
    everyone = ["long1", "long2", *cold]
    wait_until(lambda: all(ended(redis_url, rid) for rid in everyone), svc.tick)
    assert all(outcome(redis_url, rid)[1] == 0 for rid in everyone)
    stats = engine.stats()
    assert stats.prefetched == 6  # every cold adapter's host load started while queued
    assert stats.prefetched_in_time >= 4, stats  # most were in host memory at their turn
