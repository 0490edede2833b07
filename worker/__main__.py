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
import uuid
from collections.abc import Mapping

from prometheus_client import start_http_server

from adapter_store.blobs import open_blob_store
from adapter_store.settings import StoreSettings
from broker.keys import Limits, sync_client
from broker.queue import Consumer
from broker.results import Publisher
from worker.blob_cache import BlobCache
from worker.config import EngineConfig, default_cache_dir
from worker.engine import Engine
from worker.metrics import WorkerMetrics
from worker.model.loader import weight_bytes
from worker.service import ServiceSettings, WorkerService

log = logging.getLogger("worker")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorapool-worker", description="A lorapool worker")
    p.add_argument("--redis-url", help="LORAPOOL_REDIS_URL (default redis://127.0.0.1:6379/0)")
    p.add_argument("--model", help="LORAPOOL_MODEL: packaged name, HF dir, .gguf or hub id")
    p.add_argument("--device", help="LORAPOOL_DEVICE (default cpu)")
    p.add_argument("--num-pages", type=int, help="LORAPOOL_NUM_PAGES (default: from the KV budget)")
    p.add_argument(
        "--memory-mb",
        type=int,
        help="LORAPOOL_MEMORY_MB: the page pool (KV cache and resident adapters, one budget)",
    )
    p.add_argument("--max-num-seqs", type=int, help="LORAPOOL_MAX_NUM_SEQS")
    p.add_argument("--metrics-port", type=int, help="LORAPOOL_WORKER_METRICS_PORT (0: off)")
    p.add_argument("--name", help="LORAPOOL_WORKER_NAME (default host-pid-random)")
    p.add_argument("--drain", type=float, help="LORAPOOL_DRAIN_S: seconds to finish on SIGTERM")
    p.add_argument(
        "--adapter-cache-mb",
        type=int,
        help="LORAPOOL_ADAPTER_CACHE_MB: local disk budget for adapter blobs (default 2048)",
    )
    p.add_argument(
        "--quantize",
        help="LORAPOOL_QUANTIZE: nf4, fp4 or int8 for the base model's projections "
        "(bitsandbytes; default none)",
    )
    p.add_argument(
        "--compute-dtype",
        help="LORAPOOL_COMPUTE_DTYPE: the quantized matmuls' dtype (auto: the model's)",
    )
    p.add_argument(
        "--lora-dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="LORAPOOL_LORA_DTYPE: the adapters' stored dtype (auto: the model's; bfloat16 "
        "under a float32 model on the CPU reads half the bytes per step)",
    )
    p.add_argument(
        "--speculative",
        choices=["none", "ngram", "draft"],
        help="LORAPOOL_SPECULATIVE: speculative decoding for requests that do not choose "
        "(default none; docs/speculative.md)",
    )
    p.add_argument(
        "--num-speculative-tokens",
        type=int,
        help="LORAPOOL_NUM_SPECULATIVE_TOKENS: draft tokens per step, at most (default 5)",
    )
    p.add_argument(
        "--draft-model",
        help="LORAPOOL_DRAFT_MODEL: a causal LM sharing the tokenizer (as --model)",
    )
    p.add_argument(
        "--draft-layers",
        type=int,
        help="LORAPOOL_DRAFT_LAYERS: keep the draft's first N layers and its head",
    )
    p.add_argument(
        "--top-adapters",
        type=int,
        help="LORAPOOL_METRICS_TOP_ADAPTERS: adapters with their own metric label (default 50)",
    )
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
        memory_mb=number(a.memory_mb, "LORAPOOL_MEMORY_MB", base.memory_mb) or base.memory_mb,
        max_num_seqs=number(a.max_num_seqs, "LORAPOOL_MAX_NUM_SEQS", base.max_num_seqs)
        or base.max_num_seqs,
        quantize=_quantize(a.quantize or env.get("LORAPOOL_QUANTIZE")),
        compute_dtype=a.compute_dtype or env.get("LORAPOOL_COMPUTE_DTYPE") or base.compute_dtype,
        lora_dtype=a.lora_dtype or env.get("LORAPOOL_LORA_DTYPE") or base.lora_dtype,
        speculative=a.speculative or env.get("LORAPOOL_SPECULATIVE") or base.speculative,
        num_speculative_tokens=number(
            a.num_speculative_tokens, "LORAPOOL_NUM_SPECULATIVE_TOKENS", 0
        )
        or base.num_speculative_tokens,
        draft_model=a.draft_model or env.get("LORAPOOL_DRAFT_MODEL") or base.draft_model,
        draft_layers=number(a.draft_layers, "LORAPOOL_DRAFT_LAYERS", base.draft_layers) or 0,
    )


def _quantize(name: str | None) -> str | None:
    return None if name in (None, "", "none") else name


def build(a: argparse.Namespace, env: Mapping[str, str], name: str) -> WorkerService:
    """The engine, the Redis clients, the blob cache and the metrics, wired together."""
    config = engine_config(a, env)
    settings = ServiceSettings(
        max_active=config.max_num_seqs,
        drain_s=a.drain or float(env.get("LORAPOOL_DRAIN_S") or 30),
    )
    client = sync_client(
        a.redis_url or env.get("LORAPOOL_REDIS_URL") or "redis://127.0.0.1:6379/0", 2.0
    )
    metrics = WorkerMetrics(
        top_adapters=_int(a.top_adapters, env, "LORAPOOL_METRICS_TOP_ADAPTERS", 50)
    )
    port = _int(a.metrics_port, env, "LORAPOOL_WORKER_METRICS_PORT", 0)
    if port:  # LORAPOOL_METRICS_ADDR: where to listen (lorapool serve: loopback only)
        addr = env.get("LORAPOOL_METRICS_ADDR") or "0.0.0.0"  # noqa: S104
        start_http_server(port, addr=addr, registry=metrics.registry)
    cache_mb = _int(a.adapter_cache_mb, env, "LORAPOOL_ADAPTER_CACHE_MB", 2048)
    blobs = BlobCache(
        open_blob_store(StoreSettings.from_env()),
        config.cache_dir / "adapters",
        cache_mb * 1024 * 1024,
        metrics.adapter_load_seconds.observe,
    )
    log.info("loading %s on %s", config.model, config.device)
    engine = Engine.from_config(config)
    export_model_bytes(metrics, engine)
    return WorkerService(
        engine, Consumer(client, name, Limits()), Publisher(client), blobs, settings, metrics
    )


def export_model_bytes(metrics: WorkerMetrics, engine: Engine) -> None:
    """The memory report: the base model's weight bytes on the device (the loader logs it)."""
    quantization = engine.model.config.quantization or "none"
    metrics.base_model_bytes.labels(quantization=quantization).set(weight_bytes(engine.model))


def _int(flag: int | None, env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    return flag if flag is not None else int(text) if text else default


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    logging.basicConfig(
        level=env.get("LORAPOOL_LOG_LEVEL", "INFO"),
        format="%(asctime)s worker %(levelname)s %(message)s",
    )
    a = parser().parse_args(argv)
    name = (
        a.name
        or env.get("LORAPOOL_WORKER_NAME")
        or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service = build(a, env, name)
        log.info("worker %s ready", name)
        service.run(stop)
    # The process boundary: per-job failures never get here (they end their job); what does
    # (bad settings, a model that does not load, the engine's step failing) stops this
    # worker with one clear line and a non-zero status, for a supervisor to restart it.
    except Exception:  # noqa: BLE001
        log.critical("worker %s failed; exiting", name, exc_info=True)
        return 1
    log.info("worker %s stopped", name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
