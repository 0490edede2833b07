"""`lorapool-worker` / `python -m worker`: one worker process serving jobs from Redis.

Settings come from flags and `LORAPOOL_*` variables; the engine, the Redis clients and the
adapter store are built here and passed down. SIGTERM stops claiming, drains, and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from prometheus_client import start_http_server

from adapter_store.blobs import BlobStore, check_digest, open_blob_store
from adapter_store.errors import AdapterStoreError
from adapter_store.settings import StoreSettings
from broker.keys import Limits, sync_client
from broker.queue import Consumer
from broker.results import Publisher
from worker.config import EngineConfig, default_cache_dir
from worker.engine import Engine
from worker.metrics import WorkerMetrics
from worker.service import AdapterFetchError, ServiceSettings, WorkerService

log = logging.getLogger("worker")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorapool-worker", description="A lorapool worker")
    p.add_argument("--redis-url", help="LORAPOOL_REDIS_URL (default redis://127.0.0.1:6379/0)")
    p.add_argument("--model", help="LORAPOOL_MODEL: packaged name, HF dir, .gguf or hub id")
    p.add_argument("--device", help="LORAPOOL_DEVICE (default cpu)")
    p.add_argument("--num-pages", type=int, help="LORAPOOL_NUM_PAGES (default: from the KV budget)")
    p.add_argument("--kv-cache-mb", type=int, help="LORAPOOL_KV_CACHE_MB: page pool budget")
    p.add_argument("--max-num-seqs", type=int, help="LORAPOOL_MAX_NUM_SEQS")
    p.add_argument("--metrics-port", type=int, help="LORAPOOL_WORKER_METRICS_PORT (0: off)")
    p.add_argument("--name", help="LORAPOOL_WORKER_NAME (default host-pid-random)")
    p.add_argument("--drain", type=float, help="LORAPOOL_DRAIN_S: seconds to finish on SIGTERM")
    return p


def engine_config(a: argparse.Namespace, env: Mapping[str, str]) -> EngineConfig:
    base = EngineConfig(cache_dir=default_cache_dir())

    def number(flag: int | None, name: str, default: int | None) -> int | None:
        text = env.get(name)
        return flag if flag is not None else int(text) if text else default

    return EngineConfig(
        model=a.model or env.get("LORAPOOL_MODEL") or base.model,
        cache_dir=base.cache_dir,
        device=a.device or env.get("LORAPOOL_DEVICE") or base.device,
        num_pages=number(a.num_pages, "LORAPOOL_NUM_PAGES", base.num_pages),
        kv_cache_mb=number(a.kv_cache_mb, "LORAPOOL_KV_CACHE_MB", base.kv_cache_mb)
        or base.kv_cache_mb,
        max_num_seqs=number(a.max_num_seqs, "LORAPOOL_MAX_NUM_SEQS", base.max_num_seqs)
        or base.max_num_seqs,
    )


class BlobCache:
    """digest → a verified local blob file. Fetches run on a thread pool so a cold adapter
    never stalls the step loop: `__call__` answers None until the file is there."""

    def __init__(self, blobs: BlobStore, cache: Path, observe: Callable[[float], None]) -> None:
        cache.mkdir(parents=True, exist_ok=True)
        self._blobs = blobs
        self._cache = cache
        self._observe = observe  # fetch durations, for the adapter load-time histogram
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="blob-fetch")
        self._fetching: dict[str, Future[None]] = {}

    def __call__(self, digest: str) -> Path | None:
        try:
            dest = self._cache / f"{check_digest(digest)}.safetensors"
        except AdapterStoreError as exc:
            raise AdapterFetchError(f"bad adapter digest: {exc}") from exc
        if dest.is_file():
            return dest
        future = self._fetching.get(digest)
        if future is None:
            self._fetching[digest] = self._pool.submit(self._fetch, digest, dest)
            return None
        if not future.done():
            return None
        del self._fetching[digest]
        try:
            future.result()
        except (AdapterStoreError, OSError) as exc:
            raise AdapterFetchError(f"adapter {digest[:12]} could not be fetched: {exc}") from exc
        return dest

    def _fetch(self, digest: str, dest: Path) -> None:
        t0 = time.perf_counter()
        tmp = self._cache / f".{digest}.{uuid.uuid4().hex}.part"
        self._blobs.fetch_to(digest, tmp)  # verifies the sha256
        tmp.replace(dest)
        self._observe(time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    logging.basicConfig(
        level=env.get("LORAPOOL_LOG_LEVEL", "INFO"),
        format="%(asctime)s worker %(levelname)s %(message)s",
    )
    a = parser().parse_args(argv)
    config = engine_config(a, env)
    name = (
        a.name
        or env.get("LORAPOOL_WORKER_NAME")
        or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )
    settings = ServiceSettings(
        max_active=config.max_num_seqs,
        drain_s=a.drain or float(env.get("LORAPOOL_DRAIN_S") or 30),
    )
    client = sync_client(
        a.redis_url or env.get("LORAPOOL_REDIS_URL") or "redis://127.0.0.1:6379/0", 2.0
    )
    metrics = WorkerMetrics()
    port = (
        a.metrics_port
        if a.metrics_port is not None
        else int(env.get("LORAPOOL_WORKER_METRICS_PORT") or 0)
    )
    if port:
        start_http_server(port, registry=metrics.registry)
    store = StoreSettings.from_env()
    log.info("loading %s on %s", config.model, config.device)
    engine = Engine.from_config(config)
    service = WorkerService(
        engine,
        Consumer(client, name, Limits()),
        Publisher(client),
        BlobCache(
            open_blob_store(store),
            config.cache_dir / "adapters",
            metrics.adapter_load_seconds.observe,
        ),
        settings,
        metrics,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("worker %s ready", name)
    service.run(stop)
    log.info("worker %s stopped", name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
