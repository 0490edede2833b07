"""bench/gpu_check.py keeps what it measured: the report is written after every part, into
--out-dir too (what the device tool returns when a call runs out of time), a failed part
does not stop the rest, and each subprocess part gets what the budget leaves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import gpu_check, gpu_engine


def test_report_is_written_after_every_part_and_a_failure_stops_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results, out = tmp_path / "results", tmp_path / "out"
    monkeypatch.setattr(gpu_check, "RESULTS", results)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a fake GPU")
    monkeypatch.setattr(gpu_check, "gpu_tests", lambda timeout: {"returncode": 0})

    def kernels(quick: bool, timeout: float) -> dict[str, Any]:
        (results / "kernels.json").write_text('{"rows": []}')
        raise RuntimeError("kernel bench broke")

    monkeypatch.setattr(gpu_check, "kernel_bench", kernels)
    monkeypatch.setattr(gpu_check, "copy_bandwidth", lambda: 2.0e12)
    seen: dict[str, Any] = {}

    def engine(model: Path, samples: Path, prompts: list[str], bandwidth: float) -> Any:
        # the parts before this one are on disk already
        seen.update(json.loads((out / "gpu_check.json").read_text()))
        seen["bandwidth"] = bandwidth
        return {"throughput": {"lora_tax_gpu_distinct": 0.4}}

    monkeypatch.setattr(gpu_engine, "engine_report", engine)
    argv = ["--out-dir", str(out), "--model", str(tmp_path), "--commit", "abc1234"]
    assert gpu_check.main(argv) == 0
    assert seen["gpu_tests"] == {"returncode": 0}
    assert seen["kernels"] == {"error": "RuntimeError('kernel bench broke')"}
    assert seen["bandwidth"] == 2.0e12 and "engine" not in seen
    for where in (results, out):
        report = json.loads((where / "gpu_check.json").read_text())
        assert report["engine"] == {"throughput": {"lora_tax_gpu_distinct": 0.4}}
        assert report["commit"] == "abc1234" and report["device"] == "a fake GPU"
        assert "lora_tax_gpu_distinct" in (where / "gpu_check.txt").read_text()
    assert json.loads((out / "kernels.json").read_text()) == {"rows": []}


def test_each_part_gets_what_the_budget_leaves() -> None:
    ample = gpu_check.Report([], budget_s=1000, head={})
    assert ample.left(240) == 240
    tight = gpu_check.Report([], budget_s=300, head={})
    assert 170 < tight.left(240) <= 180  # 300 s less the 120 s kept for the parts after
    spent = gpu_check.Report([], budget_s=0, head={})
    assert spent.left(240) == 60  # a part always gets a minute
