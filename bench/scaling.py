"""Throughput against the number of distinct adapters, and what paging itself costs.

    python bench/scaling.py [--quick]

SmolLM2-135M on this machine's device (the CPU here), 32 concurrent rows, `REQUESTS`
requests of `NEW_TOKENS` tokens each, adapters drawn per request from n adapters:
  - n ∈ {1, 8, 64, 512}, ranks 8–64 (cycled), on q_proj and v_proj (as S-LoRA's
    experiments served attention projections: 512 all-projection fp32 adapters would
    not fit this machine's memory twice over);
  - popularity uniform, and S-LoRA's power law (request i picks adapter k with
    probability ∝ (k + 1)^-α, α = 0.3);
  - a no-adapter run of the same workload as the denominator (`vs_base`);
  - beside each point, the adapter bytes a decode step reads (distinct adapters of the
    running batch, averaged over steps) and the adapter pages' padding.
Then `residency_ratio`: at n = 512, power law, throughput with a pool holding about an
eighth of the adapters (plus the KV cache) over throughput with all of them preloaded
into the pool, both with every adapter in host memory (the device tier's cost alone).
Adapters come from a loader returning views of one shared random buffer: the host tier
costs no memory, and a page-in is the real copy into the pool.
Writes bench/results/scaling.json and bench/results/scaling.png.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from worker.config import EngineConfig, default_cache_dir
from worker.engine import Engine
from worker.lora.adapter import HostAdapter, HostLora
from worker.model.source import DEFAULT_MODEL, resolve_model_dir
from worker.sequence import SamplingParams

TARGETS = ("q_proj", "v_proj")
RANKS = (8, 16, 32, 64)
ALPHA = 0.3
ROWS, REQUESTS, NEW_TOKENS = 32, 96, 24
OUT = Path("bench/results")


class SharedLoader:
    """Adapter `a{k}`: rank RANKS[k % 4] on TARGETS, weights sliced from one random buffer."""

    def __init__(self, shapes: dict[str, tuple[int, int]], layers: int, dtype: torch.dtype):
        self.shapes, self.layers = shapes, layers
        self.buffer = torch.randn(4 * 2**20, generator=torch.Generator().manual_seed(0)) * 0.02
        self.buffer = self.buffer.to(dtype)

    def rank(self, adapter_id: str) -> int:
        return RANKS[int(adapter_id[1:]) % len(RANKS)]

    def __call__(self, adapter_id: str, _source: Path) -> HostAdapter:
        r, k = self.rank(adapter_id), int(adapter_id[1:])
        modules, offset = {}, (k * 7919) % (2**20)
        for layer in range(self.layers):
            for name in TARGETS:
                n_in, n_out = self.shapes[name]
                a = self.buffer[offset : offset + r * n_in].view(r, n_in)
                b = self.buffer[offset + 1 : offset + 1 + r * n_out].view(r, n_out)
                modules[(layer, name)] = HostLora(a, b)
        nbytes = sum(w.a.nbytes + w.b.nbytes for w in modules.values())
        return HostAdapter(adapter_id, modules, nbytes)

    def elems(self, adapter_id: str) -> int:
        return self.rank(adapter_id) * self.layers * sum(sum(self.shapes[m]) for m in TARGETS)


def workload(n: int, skewed: bool, seed: int = 0) -> list[str | None]:
    if n == 0:
        return [None] * REQUESTS
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** ALPHA for k in range(n)] if skewed else [1.0] * n
    return [f"a{rng.choices(range(n), weights)[0]}" for _ in range(REQUESTS)]


def run(engine: Engine, loader: SharedLoader, adapters: list[str | None]) -> dict[str, Any]:
    """Tokens/s of the workload, and the adapter bytes an average decode step reads."""
    prompts = [[1 + (i % 50), 2, 3, 4, 5, 6, 7, 8] for i in range(len(adapters))]
    sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        engine.add_request(f"q{i}", prompt, sampling, adapter)
    tokens, step_bytes = 0, []
    itemsize = engine.pool.buffer.element_size()
    start = time.perf_counter()
    while engine.has_unfinished():
        events = engine.step()
        tokens += sum(len(e.token_ids) for e in events)
        running = {s.adapter_id for s in engine.scheduler.running} - {None}
        step_bytes.append(sum(loader.elems(a) for a in running if a) * itemsize)
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    return {
        "tok_s": tokens / elapsed,
        "adapter_bytes_per_step": sum(step_bytes) / max(len(step_bytes), 1),
        "adapter_padding": round(stats.adapter_padding, 4),
        "device_evictions": stats.device_evictions,
    }


def make_engine(model: Path, loader: SharedLoader, n: int, memory_mb: int) -> Engine:
    # The host tier holds every adapter (the loader's views cost no memory).
    host_mb = int(max(n, 1) * loader.elems("a3") * 4 / 2**20) + 64  # a3: the largest rank
    config = EngineConfig(
        model=str(model), max_num_seqs=ROWS, memory_mb=memory_mb, host_cache_mb=host_mb
    )
    engine = Engine.from_config(config, adapter_loader=loader)
    for k in range(n):
        engine.register_adapter(f"a{k}", Path(f"/shared/a{k}"))
    return engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="n in {1, 8, 64} only")
    args = p.parse_args(argv)
    model = resolve_model_dir(DEFAULT_MODEL, default_cache_dir())
    probe = Engine.from_config(EngineConfig(model=str(model), num_pages=4))
    spec, dtype = probe.model.config.spec, probe.model.dtype
    loader = SharedLoader({m: spec.module_shape(m) for m in TARGETS}, spec.num_layers, dtype)
    page_mb = probe.pool.geometry.page_bytes / 2**20
    page_tokens = probe.pool.geometry.page_tokens
    del probe
    ns = (1, 8, 64) if args.quick else (1, 8, 64, 512)
    # room for every adapter a workload can touch (at most REQUESTS), plus the KV cache
    roomy_mb = int(min(max(ns), REQUESTS) * loader.elems("a3") * 4 / 2**20 + 512)
    base = run(make_engine(model, loader, 0, roomy_mb), loader, workload(0, False))
    points = []
    for n in ns:
        for skewed in (False, True):
            result = run(make_engine(model, loader, n, roomy_mb), loader, workload(n, skewed))
            result |= {"n": n, "popularity": "power_law" if skewed else "uniform"}
            result["vs_base"] = round(result["tok_s"] / base["tok_s"], 3)
            points.append(result)
            sys.stdout.write(json.dumps(result) + "\n")
    report: dict[str, Any] = {"workload": _workload(page_mb), "base": base, "points": points}
    if not args.quick:
        # the workload's KV cache: every row's prompt (8) and new tokens, in whole pages
        kv_mb = ROWS * -(-(8 + NEW_TOKENS) // page_tokens) * page_mb
        report["residency"] = residency(model, loader, kv_mb)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, OUT / "scaling.png")
    sys.stdout.write(json.dumps({k: report[k] for k in report if k != "points"}, indent=2) + "\n")
    return 0


def residency(model: Path, loader: SharedLoader, kv_mb: float, rounds: int = 2) -> dict[str, Any]:
    """n = 512, power law: a pool for ~1/8 of the adapters against all of them preloaded.

    Both engines start with every adapter in host memory (as S-LoRA's experiments kept
    them): the ratio is what the device tier costs, page-ins and eviction churn, not the
    host loads. The small pool holds about 64 adapters plus twice the KV cache the 32 rows
    need, so the ~85 distinct adapters the workload touches do not all fit: it evicts (the
    count is in the result). Interleaved rounds on fresh engines, the best of each."""
    n, adapters = 512, workload(512, True, seed=1)
    mean_mb = sum(loader.elems(f"a{k}") for k in range(n)) * 4 / n / 2**20
    small_mb = int(n / 8 * mean_mb + 2 * kv_mb) + 1
    all_mb = int(n * mean_mb * 1.1 + 256)
    full: list[dict[str, Any]] = []
    paged: list[dict[str, Any]] = []
    for _ in range(rounds):
        preloaded = make_engine(model, loader, n, all_mb)
        preload(preloaded, n, device=True)
        full.append(run(preloaded, loader, adapters))
        del preloaded
        small = make_engine(model, loader, n, small_mb)
        preload(small, n, device=False)
        paged.append(run(small, loader, adapters))
        del small
    best_full = max(full, key=lambda r: r["tok_s"])
    best_paged = max(paged, key=lambda r: r["tok_s"])
    return {
        "memory_mb_small": small_mb,
        "memory_mb_all": all_mb,
        "tok_s_small_pool": best_paged["tok_s"],
        "tok_s_all_preloaded": best_full["tok_s"],
        "residency_ratio": round(best_paged["tok_s"] / best_full["tok_s"], 3),
        "evictions_small_pool": best_paged["device_evictions"],
        "distinct_adapters_in_workload": len(set(adapters)),
        "runs_tok_s": {
            "small_pool": [round(r["tok_s"], 1) for r in paged],
            "all_preloaded": [round(r["tok_s"], 1) for r in full],
        },
    }


def preload(engine: Engine, n: int, device: bool) -> None:
    """Every adapter loaded into host memory, and paged into the pool if `device`."""
    for k in range(n):
        engine.adapters.prefetch(f"a{k}")
    deadline = time.monotonic() + 600
    for k in range(n):
        while not engine.adapters.ready(f"a{k}"):
            assert time.monotonic() < deadline, "adapters never loaded"
            time.sleep(0.001)
        if device:
            engine.adapters.make_resident(f"a{k}")


def _workload(page_mb: float) -> dict[str, Any]:
    return {
        "model": DEFAULT_MODEL,
        "device": "cpu",
        "rows": ROWS,
        "requests": REQUESTS,
        "new_tokens": NEW_TOKENS,
        "targets": list(TARGETS),
        "ranks": list(RANKS),
        "power_law_alpha": ALPHA,
        "page_mb": round(page_mb, 3),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for popularity in ("uniform", "power_law"):
        pts = [p for p in report["points"] if p["popularity"] == popularity]
        ax.plot([p["n"] for p in pts], [p["tok_s"] for p in pts], marker="o", label=popularity)
        for p in pts:
            ax.annotate(
                f"{p['adapter_bytes_per_step'] / 2**20:.0f} MB",
                (p["n"], p["tok_s"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    ax.axhline(report["base"]["tok_s"], color="grey", linestyle="--", label="no adapter")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters in the workload")
    ax.set_ylabel("output tokens/s")
    ax.set_title("lorapool on SmolLM2-135M (labels: adapter bytes per decode step)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
