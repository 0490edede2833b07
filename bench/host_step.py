"""The host's share of a decode step: the engine with the model's forward stubbed out.

On a GPU, once CUDA graphs have removed the launches, a small model's decode step costs
about what the host spends around the forward: scheduling, building the step's tensors
(`runner.prepare`, here on the GPU path's metadata: block tables and LoraStepMeta),
sampling and detokenizing. This measures that part on the CPU: 32 running sequences,
base rows or 32 distinct adapters, the forward replaced by zero logits. Sampling here
includes torch.argmax over [32, vocab] on the CPU (on a GPU it runs on the device).

    python -m bench.host_step [--rows 32] [--steps 60]

Writes bench/results/host_step.json: median and p10 ms per step, and per part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.engine import _env, make_adapters
from worker.config import EngineConfig, default_cache_dir
from worker.engine import Engine
from worker.model.source import DEFAULT_MODEL, resolve_model_dir
from worker.sequence import SamplingParams

PARTS = {  # part → (owner attribute of the engine, or "" for the engine itself; method)
    "schedule": ("scheduler", "schedule"),
    "prepare": ("runner", "prepare"),
    "sample": ("speculator", "tokens"),
    "append_detokenize": ("", "_append"),
}


def measure(engine: Engine, adapters: list[str | None], steps: int) -> dict[str, Any]:
    sampling = SamplingParams(max_tokens=10_000, ignore_eos=True)
    for i, adapter in enumerate(adapters):
        engine.add_request(f"h{i}", [1, 2, 3, 4, 5, 6, 7, 8], sampling, adapter)
    deadline = time.monotonic() + 300
    while engine.scheduler.waiting or any(s.num_computed == 0 for s in engine.scheduler.running):
        engine.step()  # prefill, and adapters paged in
        assert time.monotonic() < deadline, "the requests never started decoding"
    spent: dict[str, float] = dict.fromkeys(PARTS, 0.0)
    restore = [_timed(engine, part, spent) for part in PARTS]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for undo in restore:
        undo()
    for i in range(len(adapters)):
        engine.cancel(f"h{i}")
    engine.step()
    times.sort()
    return {
        "median_ms": round(statistics.median(times) * 1e3, 3),
        "p10_ms": round(times[len(times) // 10] * 1e3, 3),
        "parts_ms": {part: round(s / steps * 1e3, 3) for part, s in spent.items()},
    }


def _timed(engine: Engine, part: str, spent: dict[str, float]) -> Callable[[], None]:
    owner_name, method = PARTS[part]
    owner = getattr(engine, owner_name) if owner_name else engine
    real = getattr(owner, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - start

    setattr(owner, method, timed)
    return lambda: delattr(owner, method)  # the instance attribute shadowed the class's


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("bench/results/host_step.json"))
    args = parser.parse_args()
    base_dir = resolve_model_dir(DEFAULT_MODEL, default_cache_dir())
    with tempfile.TemporaryDirectory() as tmp:
        make_adapters(base_dir, Path(tmp), args.rows)
        config = EngineConfig(model=str(base_dir), max_num_seqs=args.rows, cpu_kernels=False)
        engine = Engine.from_config(config)
        engine.runner.paged = True  # the GPU path's step tensors (block tables, LoraStepMeta)
        vocab = engine.model.lm_head.shape[0]
        engine.model.forward = lambda batch, kv: torch.zeros(  # type: ignore[method-assign]
            batch.logits_index.shape[0], vocab
        )
        names = [f"a{i}" for i in range(args.rows)]
        for name in names:
            engine.register_adapter(name, Path(tmp) / name)
        results = {
            "base": measure(engine, [None] * args.rows, args.steps),
            "lora_distinct": measure(engine, list(names), args.steps),
        }
    report = {"workload": {"rows": args.rows, "steps": args.steps}, "results": results}
    report["env"] = _env(torch.get_num_threads())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
