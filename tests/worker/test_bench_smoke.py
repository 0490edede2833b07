"""Benchmarks' engine parts run end to end on a tiny model: bench/gpu_engine.py's
throughput (the first GPU host to run `make gpu-check` must get numbers, not a traceback)
and bench/host_step.py's per-part host timing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import gpu_engine, host_step
from tests.worker.conftest import save_tiny
from worker.config import EngineConfig
from worker.engine import Engine


def test_throughput_reports_every_case_with_and_without_graphs(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = save_tiny(tmp_path, smollm2_dir, "llama", 0, hidden_size=32, intermediate_size=64)
    monkeypatch.setattr(gpu_engine, "ROWS", 8)
    monkeypatch.setattr(gpu_engine, "STEPS", 3)
    out = gpu_engine.throughput(base, 1e10, "cpu")
    cases = {"base", "distinct", "shared"}
    keys = ("decode_step_ms", "forward_ms", "graph_speedup", "graph_speedup_forward")
    for key in (*keys, "decode_step_ms_eager", "forward_ms_eager"):
        assert set(out[key]) == cases and all(v > 0 for v in out[key].values()), key
    for case in cases:  # the forward is a part of the step
        for suffix in ("", "_eager"):
            assert out["forward_ms" + suffix][case] < out["decode_step_ms" + suffix][case]
    assert out["cuda_graphs"] is None  # the CPU attaches none
    for case in ("distinct", "shared"):
        assert 0 < out[f"lora_tax_gpu_{case}_ceiling"] < 1
        assert out[f"lora_tax_gpu_{case}"] > 0 and out[f"lora_tax_gpu_{case}_wall"] > 0
    assert out["base_step_over_bytes_floor"] < out["base_step_over_bytes_floor_wall"]
    # 8 distinct adapters read more bytes than 4 shared by the 8 rows
    assert out["adapter_bytes_per_step"]["distinct"] > out["adapter_bytes_per_step"]["shared"] > 0
    assert out["adapter_bytes_per_step"]["base"] == 0


def test_host_step_times_every_part_and_restores_the_engine(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    base = save_tiny(tmp_path, smollm2_dir, "llama", 0, hidden_size=32, intermediate_size=64)
    engine = Engine.from_config(EngineConfig(model=str(base), max_num_seqs=4))
    engine.runner.paged = True
    vocab = engine.model.lm_head.shape[0]
    engine.model.forward = lambda batch, kv: torch.zeros(  # type: ignore[method-assign]
        batch.logits_index.shape[0], vocab
    )
    out = host_step.measure(engine, [None] * 4, steps=5)
    assert set(out["parts_ms"]) == set(host_step.PARTS)
    assert out["p10_ms"] <= out["median_ms"]  # an order statistic below the median
    assert "_append" not in vars(engine) and "prepare" not in vars(engine.runner)  # restored
    assert not engine.has_unfinished()


class _Model:
    def __init__(self) -> None:
        self.calls = 0

    def forward(self, batch: object, kv: object) -> str:
        self.calls += 1
        return "logits"


class _Graphs:
    def __init__(self, model: _Model, eager: bool) -> None:
        self.model, self.eager = model, eager

    def run(self, batch: object) -> str | None:  # an eager replay calls the model inside
        return self.model.forward(batch, None) if self.eager else None


class _Runner:
    def __init__(self, eager_replay: bool) -> None:
        self.model = _Model()
        self.model.device = torch.device("cpu")  # type: ignore[attr-defined]
        self.graphs = _Graphs(self.model, eager_replay)


@pytest.mark.parametrize("eager_replay", [True, False])
def test_forward_clock_times_each_forward_once_and_unpatches(eager_replay: bool) -> None:
    engine = type("FakeEngine", (), {"runner": _Runner(eager_replay)})()
    runner = engine.runner
    with gpu_engine.ForwardClock(engine) as clock:  # type: ignore[arg-type]
        # the runner's order: the graphs first, the model's forward when they decline
        logits = runner.graphs.run("batch") or runner.model.forward("batch", None)
        assert logits == "logits" and runner.model.calls == 1
        assert len(clock.calls) == (1 if eager_replay else 2)
        assert clock.take_ms() >= 0 and clock.calls == []
    assert "forward" not in vars(runner.model) and "run" not in vars(runner.graphs)
