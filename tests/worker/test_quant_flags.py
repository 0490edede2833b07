"""--quantize / --compute-dtype on lorapool-worker, `lorapool serve` and `lorapool run`; the
memory gauge; the warning for an adapter trained on another base quantization; bf16 compute."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import BitsAndBytesConfig

from lorapool import stack
from lorapool.cli import main as lorapool_main
from tests.worker.adapters import make_adapter
from tests.worker.test_quant import compare_to_hf, hf_quantized
from worker.__main__ import engine_config, export_model_bytes, parser
from worker.config import EngineConfig
from worker.engine import Engine
from worker.metrics import WorkerMetrics
from worker.model.loader import weight_bytes
from worker.model.quant import UnsupportedQuantizationError
from worker.sequence import SamplingParams


def test_worker_flags_and_environment() -> None:
    config = engine_config(
        parser().parse_args(["--quantize", "nf4", "--compute-dtype", "bfloat16"]), {}
    )
    assert (config.quantize, config.compute_dtype) == ("nf4", "bfloat16")
    from_env = engine_config(parser().parse_args([]), {"LORAPOOL_QUANTIZE": "int8"})
    assert (from_env.quantize, from_env.compute_dtype) == ("int8", "auto")
    assert engine_config(parser().parse_args(["--quantize", "none"]), {}).quantize is None
    with pytest.raises(UnsupportedQuantizationError, match="'q4'"):
        engine_config(parser().parse_args(["--quantize", "q4"]), {})


def test_serve_passes_the_flags_to_its_workers(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    stack.add_arguments(p)
    args = p.parse_args(["--quantize", "nf4", "--compute-dtype", "bfloat16"])
    env = {"LORAPOOL_BASE_MODEL_DIR": str(tmp_path), "LORAPOOL_REDIS_URL": "redis://x:1/0"}
    plan = stack.plan_of(args, {**env, "LORAPOOL_DATA_DIR": str(tmp_path)})
    assert plan.env["LORAPOOL_QUANTIZE"] == "nf4"
    assert plan.env["LORAPOOL_COMPUTE_DTYPE"] == "bfloat16"
    assert "LORAPOOL_QUANTIZE" not in stack.plan_of(p.parse_args([]), env).env


def test_serve_and_run_refuse_an_unsupported_name(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    stack.add_arguments(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--quantize", "nf3"])
    assert "unsupported quantization 'nf3'" in capsys.readouterr().err
    assert lorapool_main(["run", "--quantize", "nf3", "hello"]) == 2
    assert "unsupported quantization 'nf3'" in capsys.readouterr().err


def test_the_gauge_exports_the_weight_bytes(tiny_model: Callable[..., Path]) -> None:
    metrics = WorkerMetrics()
    engine = Engine.from_config(EngineConfig(model=str(tiny_model("llama")), quantize="nf4"))
    export_model_bytes(metrics, engine)
    value = metrics.registry.get_sample_value(
        "lorapool_worker_base_model_bytes", {"quantization": "nf4"}
    )
    assert value == weight_bytes(engine.model) > 0


@pytest.mark.parametrize(("trained_on", "warned"), [("int8", True), ("nf4", False), (None, False)])
def test_warns_when_served_on_another_quantization(
    trained_on: str | None,
    warned: bool,
    tiny_model: Callable[..., Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tiny_model("llama")
    adapter = make_adapter(path, tmp_path / "adapter", r=4, alpha=8)
    if trained_on is not None:
        configs = {
            "int8": BitsAndBytesConfig(load_in_8bit=True),
            "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        }
        config_path = adapter / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["quantization_config"] = json.loads(configs[trained_on].to_json_string())
        config_path.write_text(json.dumps(config))
    engine = Engine.from_config(EngineConfig(model=str(path), quantize="nf4", page_size=4))
    engine.register_adapter("a", adapter)
    with caplog.at_level(logging.WARNING, logger="adapter_store.validation"):
        result = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2), ["a"])[0]
    assert len(result.token_ids) == 2  # served either way
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "adapter_store.validation" and r.levelno == logging.WARNING
    ]
    if warned:
        assert len(warnings) == 1
        assert "trained on a int8 base, served on a nf4 base" in warnings[0]
    else:
        assert warnings == []


def test_bfloat16_compute_matches_hf_bnb(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("llama")
    config = EngineConfig(model=str(path), quantize="nf4", compute_dtype="bfloat16", page_size=4)
    engine = Engine.from_config(config)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    compare_to_hf(engine, hf_quantized(path, bnb))
