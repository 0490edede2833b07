"""Serving benchmark: concurrent streaming clients through the gateway, 1 and 2 workers.

Writes bench/results/serving.json: requests/s, output tokens/s, TTFT and inter-token
latency p50/p99 per worker count, and the gateway+Redis overhead as the ratio of
throughput through the gateway (1 worker) to the engine driven directly on the same
workload (target >= 0.9). Ratios, not absolute times: these machines are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protos.lorapool.v1 import generation_pb2, generation_pb2_grpc  # noqa: E402
from tests.serving.redis_proc import RedisProcess  # noqa: E402
from tests.serving.stack import Stack, base_env  # noqa: E402

PROMPTS = [f"Write one sentence about the number {i}." for i in range(64)]


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values or [0.0])[0]
    )


def one(target: str, prompt: str, max_tokens: int) -> tuple[int, float, list[float]]:
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(target))
    request = generation_pb2.GenerateRequest(
        text=prompt, sampling=generation_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    )
    t0 = time.perf_counter()
    stamps = []
    tokens = 0
    for r in stub.Generate(request, timeout=600):
        if r.HasField("delta"):
            stamps.append(time.perf_counter())
            tokens += len(r.delta.token_ids)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return tokens, stamps[0] - t0, gaps


def through_gateway(target: str, n: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(
            pool.map(lambda i: one(target, PROMPTS[i % len(PROMPTS)], max_tokens), range(n))
        )
    wall = time.perf_counter() - t0
    ttft = [r[1] for r in results]
    itl = [g for r in results for g in r[2]]
    return {
        "requests_per_s": n / wall,
        "output_tokens_per_s": sum(r[0] for r in results) / wall,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_s": pct(itl, 50),
        "itl_p99_s": pct(itl, 99),
    }


def engine_direct(n: int, max_tokens: int, max_num_seqs: int) -> float:
    """Output tokens/s of the engine alone on the same workload."""
    from worker.config import EngineConfig, default_cache_dir
    from worker.engine import Engine
    from worker.sequence import SamplingParams

    engine = Engine.from_config(
        EngineConfig(cache_dir=default_cache_dir(), num_pages=1024, max_num_seqs=max_num_seqs)
    )
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    events = engine.generate([PROMPTS[i % len(PROMPTS)] for i in range(n)], sampling)
    return sum(len(e.token_ids) for e in events) / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=16, help="clients streaming at once")
    p.add_argument("--max-num-seqs", type=int, default=8, help="the engine's batch limit")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="torch threads per worker",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    a = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the workers (base_env): no spinning
    import torch

    from worker.config import default_cache_dir
    from worker.model.source import DEFAULT_MODEL, resolve_model_dir

    torch.set_num_threads(a.threads)  # the same compute for the direct engine as for one worker
    model_dir = resolve_model_dir(DEFAULT_MODEL, default_cache_dir())
    direct = engine_direct(a.requests, a.max_tokens, a.max_num_seqs)
    results: dict[str, object] = {
        "workload": vars(a) | {"out": str(a.out)},
        "engine_direct_tokens_per_s": direct,
    }
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc = RedisProcess(Path(tmp))
        redis_proc.start()
        env = base_env(Path(tmp), redis_proc.url, f"sqlite:///{tmp}/r.sqlite3", model_dir)
        env.update(
            LORAPOOL_MAX_NUM_SEQS=str(a.max_num_seqs),
            LORAPOOL_MAX_DEPTH_PER_ADAPTER="4096",
            LORAPOOL_MAX_DEPTH_TOTAL="4096",
            LORAPOOL_NUM_PAGES="1024",
            OMP_NUM_THREADS=str(a.threads),
        )
        from adapter_store.db import upgrade

        upgrade(env["LORAPOOL_DATABASE_URL"])
        stack = Stack(env, Path(tmp))
        try:
            stack.start_gateway()
            for workers in (1, 2):
                stack.start_worker(f"w{workers}")
                stack.wait_workers()
                one(stack.target, PROMPTS[0], 4)  # warm-up
                results[f"workers_{workers}"] = through_gateway(
                    stack.target, a.requests, a.concurrency, a.max_tokens
                )
        finally:
            stack.stop()
            redis_proc.stop()
    one_worker = results["workers_1"]
    assert isinstance(one_worker, dict)
    results["gateway_overhead_ratio"] = one_worker["output_tokens_per_s"] / direct
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
