"""bench/kernels.py runs on a bare GPU host (torch + triton only) and its smoke mode works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# installed here, absent on the GPU host (which has torch, triton, transformers, safetensors)
NOT_ON_GPU_HOST = (
    "redis", "sqlalchemy", "alembic", "psycopg", "peft", "bitsandbytes", "boto3", "grpc",
    "prometheus_client", "adapter_store", "broker", "gateway", "protos", "transformers",
)  # fmt: skip


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_bench_imports_only_torch_triton_and_the_kernels() -> None:
    probe = (
        "import sys, bench.kernels, bench.kernel_cases\n"
        "import worker.kernels.sgmv, worker.kernels.bgmv, worker.kernels.paged_attention\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = run_python("-c", probe)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert {"torch", "triton", "worker", "bench"} <= loaded
    assert not loaded & set(NOT_ON_GPU_HOST), loaded & set(NOT_ON_GPU_HOST)


def test_bench_smoke_runs_every_kernel_and_baseline(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    done = run_python("-m", "bench.kernels", "--smoke", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["partial"] is False
    kernels = {r["kernel"] for r in result["rows"]}
    lora = {f"{k}_{op}" for k in ("sgmv", "bgmv") for op in ("shrink", "expand", "lora")}
    assert kernels == lora | {"decode_attention", "varlen_attention"}
    for row in result["rows"]:
        speedups = [v for k, v in row.items() if k.startswith("speedup_vs")]
        assert row["ms"] > 0 and row["bytes"] > 0 and len(speedups) == 2
    assert set(result["targets"]) == {
        "bgmv_b64_distinct_frac_of_copy_ge_0.7",
        "sgmv_b64_over_b1_distinct_le_3",
        "every_kernel_beats_both_baselines",
    }
