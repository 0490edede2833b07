"""bench/gpu_engine.py's throughput part runs end to end (on the CPU, a tiny model): the
first GPU host to run `make gpu-check` must get numbers, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import gpu_engine
from tests.worker.conftest import save_tiny


def test_throughput_reports_every_case_with_and_without_graphs(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = save_tiny(tmp_path, smollm2_dir, "llama", 0, hidden_size=32, intermediate_size=64)
    monkeypatch.setattr(gpu_engine, "ROWS", 8)
    monkeypatch.setattr(gpu_engine, "STEPS", 3)
    out = gpu_engine.throughput(base, 1e10, "cpu")
    cases = {"base", "distinct", "shared"}
    for key in ("decode_step_ms", "decode_step_ms_eager", "graph_speedup"):
        assert set(out[key]) == cases and all(v > 0 for v in out[key].values()), key
    assert out["cuda_graphs"] is None  # the CPU attaches none
    for case in ("distinct", "shared"):
        assert 0 < out[f"lora_tax_gpu_{case}_ceiling"] < 1
        assert out[f"lora_tax_gpu_{case}"] > 0
    # 8 distinct adapters read more bytes than 4 shared by the 8 rows
    assert out["adapter_bytes_per_step"]["distinct"] > out["adapter_bytes_per_step"]["shared"] > 0
    assert out["adapter_bytes_per_step"]["base"] == 0
