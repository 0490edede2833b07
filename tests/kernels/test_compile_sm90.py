"""Every Triton kernel compiles for an H100 (sm_90) at the tiles the CUDA branches choose,
without a GPU: Triton's compiler and its bundled ptxas, ahead of time (bench/
kernel_compile.py). The interpreter that runs the kernels in `make test` never compiles,
so a tile the tensor cores refuse or one that needs more shared memory than the GPU has
would otherwise first show on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("sgmv_shrink", "sgmv_expand", "bgmv_shrink", "bgmv_expand")
FAMILIES += ("decode_attention", "combine", "varlen_attention")


def compiled_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_every_kernel_compiles_for_sm90_within_its_shared_memory(tmp_path: Path) -> None:
    out = tmp_path / "compile.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.kernel_compile", "--out", str(out)],
        cwd=ROOT, env=compiled_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    names = {r["kernel"] for r in rows}
    assert names == {f"{f} {dt}" for f in FAMILIES for dt in ("bf16", "fp32")}
    for row in rows:
        assert row["ok"] and 0 <= row["shared_bytes"] <= 227 * 1024, row
    # bf16, the dtype served on GPUs: no register spills at the warps the wrappers choose
    # (with 4 warps, head_dim-128 attention and 64-row SGMV expand tiles spilled)
    bf16 = [r for r in rows if r["kernel"].endswith("bf16")]
    assert all("stack" in r for r in bf16)  # cuobjdump ships with Triton's NVIDIA backend
    assert [r for r in bf16 if r["stack"] > 0] == []


def test_a_variant_over_the_shared_memory_limit_fails_the_run() -> None:
    # the same check with a limit every attention tile exceeds: the run must say so
    probe = (
        "import sys\n"
        "import bench.kernel_compile as k\n"
        "every = k.variants\n"
        "k.variants = lambda: (v for v in every() if v[0] == 'varlen_attention bf16')\n"
        "k.SMEM_LIMIT = 1024\n"
        "sys.exit(k.main([]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT, env=compiled_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "FAIL varlen_attention bf16" in done.stdout
    assert "0 of 4 variants compiled" in done.stdout
