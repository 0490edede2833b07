"""`make gpu-check`: everything a GPU host can tell us, in one command, within ten minutes.

Needs only torch, triton, transformers and safetensors (no Redis, SQLAlchemy, PEFT or
bitsandbytes): the project code it imports is the engine and the kernels.

    python3 -m bench.gpu_check [--model DIR | --pack DIR] [--quick] [--out-dir DIR]
                               [--budget-s S] [--commit SHA]

  1. the GPU-marked tests (kernels against float64, the engine on CUDA against the CPU)
  2. SmolLM2 in bf16 on the GPU: greedy tokens of the sample adapters against the CPU
     reference; decode throughput with no adapter, 32 distinct adapters (ranks 8/16, all
     seven projections) and 4 adapters shared by the 32 rows, each LoRA tax beside its
     bytes ceiling (a decode step is bound by the bytes it reads), and the base decode
     step against the bytes floor of its weights at the measured copy bandwidth.
  3. bench/kernels.py (kernel times, bandwidth against a same-run copy, baselines)

--model: a HF directory of safetensors; --pack: a pack of the packaged SmolLM2 written by
bench/gpu_pack.py (its GGUF blocks, exact, in two parts small enough to carry to a host
without internet), unpacked first where the packaged model is cached (or into --model), so
that the GPU tests, which use its tokenizer, find it too; default: the packaged model's
cache.
Writes bench/results/gpu_check.json and gpu_check.txt after every part, and into --out-dir
with bench/results/kernels.json beside them. Each subprocess part gets what the budget
leaves (the device tool's calls end at 10 minutes); docs/gpu-check.md is the procedure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path("bench/results")
SAMPLES = Path("samples/adapters")
PROMPTS = ["Name three colors.", "What is the capital of Italy?", "Describe the sea in one line."]


class Report:
    """The report so far, written after every part: a host call that runs out of time still
    returns what was measured (the device tool returns what is under $OUT at its limit)."""

    def __init__(self, out_dirs: list[Path], budget_s: float, head: dict[str, Any]) -> None:
        self.out_dirs, self.data = out_dirs, dict(head)
        self.deadline = time.monotonic() + budget_s

    def left(self, cap: float, reserve: float = 120) -> float:
        """Seconds a part may take: its cap, or what the budget leaves after a reserve for
        the parts after it, at least a minute."""
        return max(60.0, min(cap, self.deadline - time.monotonic() - reserve))

    def step(self, name: str, fn: Any) -> None:
        t0 = time.perf_counter()
        try:
            self.data[name] = fn()
        except Exception as exc:  # noqa: BLE001 (one failed part must not hide the others)
            self.data[name] = {"error": repr(exc)}
        self.data[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        sys.stdout.write(f"{name}: {json.dumps(self.data[name])[:400]}\n")
        sys.stdout.flush()
        self.write()

    def attach(self, path: Path) -> None:
        """Copy a file another part wrote (kernels.json) next to the report."""
        for out in self.out_dirs:
            if path.is_file() and out.resolve() != path.parent.resolve():
                shutil.copy(path, out / path.name)

    def write(self) -> None:
        for out in self.out_dirs:
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu_check.json").write_text(json.dumps(self.data, indent=2) + "\n")
            (out / "gpu_check.txt").write_text(_text(self.data))


# the GPU-marked tests of each half (--only): the engine's need the model, the kernels' not
GPU_TESTS = {"kernels": ["tests/kernels"], "engine": ["tests/worker/test_gpu_engine.py"]}


def gpu_tests(timeout: float, halves: list[str]) -> dict[str, Any]:
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    done = _run([*argv, *(path for half in halves for path in GPU_TESTS[half])], timeout)
    if isinstance(done, dict):
        return done
    return {"returncode": done.returncode, "tail": done.stdout.strip().splitlines()[-3:]}


def kernel_bench(quick: bool, timeout: float) -> dict[str, Any]:
    path = RESULTS / "kernels.json"
    path.unlink(missing_ok=True)  # an earlier run's targets must not pass for this run's
    done = _run([sys.executable, "-m", "bench.kernels", *(["--quick"] if quick else [])], timeout)
    if isinstance(done, dict):
        return done
    summary = json.loads(path.read_text()).get("targets", {}) if path.is_file() else {}
    return {"returncode": done.returncode, "targets": summary, "tail": done.stdout[-400:]}


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str] | dict[str, Any]:
    """The finished process, or what a part that ran out of time reports."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout
        text = out.decode(errors="replace") if isinstance(out, bytes) else out or ""
        return {"timed_out_s": timeout, "tail": text.strip().splitlines()[-3:]}


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
    p.add_argument("--pack", type=Path, help="a bench/gpu_pack.py pack, unpacked first")
    p.add_argument("--quick", action="store_true", help="the kernel bench's quick sweep")
    p.add_argument("--cpu-smoke", action="store_true", help="the engine part on the CPU only")
    p.add_argument("--out-dir", type=Path, help="also write the report here (e.g. $OUT)")
    p.add_argument("--budget-s", type=float, default=560, help="time for all parts (s)")
    p.add_argument("--commit", help="the commit to record (a copied tree may have no .git)")
    p.add_argument(
        "--only",
        choices=list(GPU_TESTS),
        help="one half: kernels (their GPU tests and bench; no model needed) or engine (its"
        " GPU tests and SmolLM2), e.g. one per device call (docs/gpu-check.md)",
    )
    args = p.parse_args(argv)
    halves = [args.only] if args.only else list(GPU_TESTS)
    if (
        args.pack and "engine" in halves
    ):  # by default where the packaged model is cached: the GPU tests find it
        from bench.gpu_pack import unpack
        from worker.config import default_cache_dir
        from worker.model.source import DEFAULT_MODEL, packaged_model_dir

        target = args.model or packaged_model_dir(DEFAULT_MODEL, default_cache_dir())
        args.model = unpack(args.pack, target)
    if args.cpu_smoke:  # checks this script's engine part where there is no GPU
        from bench.gpu_engine import engine_report

        out = engine_report(args.model or _default_model(), SAMPLES, PROMPTS[:1], 1e10, "cpu")
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return 0
    if not torch.cuda.is_available():
        sys.stderr.write("gpu_check: no CUDA device here\n")
        return 2
    from bench.gpu_engine import engine_report

    report = Report(
        [RESULTS, *([args.out_dir] if args.out_dir else [])],
        args.budget_s,
        {
            "halves": halves,
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": args.commit or _commit(),
        },
    )
    # The engine part has no time limit of its own (it runs in this process), so it goes
    # before the kernel bench, which takes what the budget leaves and saves as it goes.
    report.step("copy_bytes_per_s", copy_bandwidth)
    bandwidth = report.data["copy_bytes_per_s"]
    if not isinstance(bandwidth, float):  # the copy failed: no bytes ceilings, the rest runs
        bandwidth = float("nan")
    report.step("gpu_tests", lambda: gpu_tests(report.left(200), halves))
    if "engine" in halves:
        model = args.model or _default_model()
        report.step("engine", lambda: engine_report(model, SAMPLES, PROMPTS, bandwidth))
    if "kernels" in halves:
        # the last part: all the budget leaves (alone in its call, up to 420 s)
        cap = 420 if halves == ["kernels"] else 240
        report.step("kernels", lambda: kernel_bench(args.quick, report.left(cap, reserve=10)))
        report.attach(RESULTS / "kernels.json")
    sys.stdout.write(_text(report.data))
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
    lines = [
        f"gpu-check ({', '.join(report['halves'])}) on {report['device']} "
        f"({report['date']}, commit {report['commit']})"
    ]
    head = ("halves", "device", "date", "commit", "torch")
    for key, value in report.items():
        if key not in head and not key.endswith("_seconds"):  # the parts' own times stay out
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
