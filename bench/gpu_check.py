"""`make gpu-check`: everything a GPU host can tell us, in one command, within ten minutes.

Needs only torch, triton, transformers and safetensors (no Redis, SQLAlchemy, PEFT or
bitsandbytes): the project code it imports is the engine and the kernels.

    python3 -m bench.gpu_check [--model DIR] [--quick]

  1. the GPU-marked tests (kernels against float64, the engine on CUDA against the CPU)
  2. bench/kernels.py (kernel times, bandwidth against a same-run copy, baselines)
  3. SmolLM2 in bf16 on the GPU: greedy tokens of the sample adapters against the CPU
     reference; decode throughput with no adapter, 32 distinct adapters (ranks 8/16, all
     seven projections) and 4 adapters shared by the 32 rows, each LoRA tax beside its
     bytes ceiling (a decode step is bound by the bytes it reads), and the base decode
     step against the bytes floor of its weights at the measured copy bandwidth.

--model: a HF directory of safetensors (bench/gpu_pack.py writes SmolLM2 as bf16 shards
small enough to carry to a host without internet); default: the packaged model's cache.
Writes bench/results/gpu_check.json and gpu_check.txt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path("bench/results")
SAMPLES = Path("samples/adapters")
PROMPTS = ["Name three colors.", "What is the capital of Italy?", "Describe the sea in one line."]


def step(name: str, fn: Any, report: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as exc:  # noqa: BLE001 (one failed part must not hide the others)
        report[name] = {"error": repr(exc)}
    report[name + "_seconds"] = round(time.perf_counter() - t0, 1)
    sys.stdout.write(f"{name}: {json.dumps(report[name])[:400]}\n")
    sys.stdout.flush()


def gpu_tests() -> dict[str, Any]:
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    argv += ["tests/kernels", "tests/worker/test_gpu_engine.py"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=360, check=False)
    return {"returncode": done.returncode, "tail": done.stdout.strip().splitlines()[-3:]}


def kernel_bench(quick: bool) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.kernels", *(["--quick"] if quick else [])]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    path = RESULTS / "kernels.json"
    summary = json.loads(path.read_text()).get("targets", {}) if path.is_file() else {}
    return {"returncode": done.returncode, "targets": summary, "tail": done.stdout[-400:]}


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (bytes read plus bytes written)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 20 / (start.elapsed_time(end) / 1000)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="HF safetensors directory (default: the cache)")
    p.add_argument("--quick", action="store_true", help="the kernel bench's quick sweep")
    p.add_argument("--cpu-smoke", action="store_true", help="the engine part on the CPU only")
    args = p.parse_args(argv)
    if args.cpu_smoke:  # checks this script's engine part where there is no GPU
        from bench.gpu_engine import engine_report

        out = engine_report(args.model or _default_model(), SAMPLES, PROMPTS[:1], 1e10, "cpu")
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return 0
    if not torch.cuda.is_available():
        sys.stderr.write("gpu_check: no CUDA device here\n")
        return 2
    from bench.gpu_engine import engine_report

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": _commit(),
    }
    step("gpu_tests", gpu_tests, report)
    step("kernels", lambda: kernel_bench(args.quick), report)
    step("copy_bytes_per_s", copy_bandwidth, report)
    bandwidth = report["copy_bytes_per_s"]
    model = args.model or _default_model()
    step("engine", lambda: engine_report(model, SAMPLES, PROMPTS, bandwidth), report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "gpu_check.txt").write_text(_text(report))
    sys.stdout.write(_text(report))
    return 0


def _default_model() -> Path:
    from worker.config import default_cache_dir
    from worker.model.source import DEFAULT_MODEL, resolve_model_dir

    return resolve_model_dir(DEFAULT_MODEL, default_cache_dir())


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


def _text(report: dict[str, Any]) -> str:
    lines = [f"gpu-check on {report['device']} ({report['date']}, commit {report['commit']})"]
    for key, value in report.items():
        if key not in ("device", "date", "commit", "torch") and not key.endswith("_seconds"):
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
