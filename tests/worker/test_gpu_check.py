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
    monkeypatch.setattr(gpu_check, "copy_bandwidth", lambda: 2.0e12)
    monkeypatch.setattr(gpu_check, "gpu_tests", lambda timeout, halves: {"returncode": 0})
    seen: dict[str, Any] = {}

    def engine(model: Path, samples: Path, prompts: list[str], bandwidth: float) -> Any:
        seen["before engine"] = json.loads((out / "gpu_check.json").read_text())
        seen["bandwidth"] = bandwidth
        raise RuntimeError("engine broke")

    def kernels(quick: bool, timeout: float) -> dict[str, Any]:
        seen["before kernels"] = json.loads((out / "gpu_check.json").read_text())
        (results / "kernels.json").write_text('{"rows": []}')
        return {"returncode": 0, "targets": {"every_kernel_beats_both_baselines": True}}

    monkeypatch.setattr(gpu_engine, "engine_report", engine)
    monkeypatch.setattr(gpu_check, "kernel_bench", kernels)
    argv = ["--out-dir", str(out), "--model", str(tmp_path), "--commit", "abc1234"]
    assert gpu_check.main(argv) == 0
    # each part finds the parts before it on disk already
    assert seen["before engine"]["gpu_tests"] == {"returncode": 0}
    assert seen["before engine"]["copy_bytes_per_s"] == 2.0e12 == seen["bandwidth"]
    assert seen["before kernels"]["engine"] == {"error": "RuntimeError('engine broke')"}
    for where in (results, out):
        report = json.loads((where / "gpu_check.json").read_text())
        assert report["engine"] == {"error": "RuntimeError('engine broke')"}  # and on it went
        assert report["kernels"]["targets"] == {"every_kernel_beats_both_baselines": True}
        assert report["commit"] == "abc1234" and report["device"] == "a fake GPU"
        assert "every_kernel_beats_both_baselines" in (where / "gpu_check.txt").read_text()
    assert json.loads((out / "kernels.json").read_text()) == {"rows": []}


def test_each_part_gets_what_the_budget_leaves() -> None:
    ample = gpu_check.Report([], budget_s=1000, head={})
    assert ample.left(240) == 240
    tight = gpu_check.Report([], budget_s=300, head={})
    assert 170 < tight.left(240) <= 180  # 300 s less the 120 s kept for the parts after
    assert 280 < tight.left(400, reserve=10) <= 290  # the last part keeps no reserve
    spent = gpu_check.Report([], budget_s=0, head={})
    assert spent.left(240) == 60  # a part always gets a minute


@pytest.mark.parametrize(("only", "parts"), [("kernels", {"kernels"}), ("engine", {"engine"})])
def test_each_half_runs_its_own_parts(
    only: str, parts: set[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a fake GPU")
    monkeypatch.setattr(gpu_check, "copy_bandwidth", lambda: 2.0e12)
    ran: dict[str, Any] = {}
    monkeypatch.setattr(
        gpu_check, "gpu_tests", lambda timeout, halves: ran.setdefault("tests", halves)
    )
    monkeypatch.setattr(
        gpu_check, "kernel_bench", lambda quick, timeout: ran.setdefault("kernels", True)
    )
    monkeypatch.setattr(gpu_engine, "engine_report", lambda *a: ran.setdefault("engine", True))
    # the kernels' half needs no model: none is given, and none is looked for
    monkeypatch.setattr(gpu_check, "_default_model", lambda: pytest.fail("model looked up"))
    argv = ["--only", only, "--out-dir", str(tmp_path / "out")]
    argv += ["--model", str(tmp_path)] if only == "engine" else []
    assert gpu_check.main(argv) == 0
    assert ran.pop("tests") == [only] and set(ran) == parts
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["halves"] == [only] and set(report) & {"engine", "kernels"} == parts
    assert gpu_check.GPU_TESTS[only]  # that half has GPU tests to run
