"""Bad adapters fail their own requests with a clear error; the engine serves the rest."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.worker.adapters import make_adapter
from worker.config import EngineConfig
from worker.engine import Engine
from worker.sequence import FinishReason, SamplingParams

MARKER = "/tmp/lorapool-pickle-marker-engine"


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (open, (MARKER, "w"))


def _good(tmp: Path, base: Path) -> Path:
    return make_adapter(base, tmp / "good", r=4, alpha=8, targets=["q_proj", "v_proj"])


def _missing(tmp: Path, base: Path) -> Path:
    return tmp / "nowhere"


def _malformed_config(tmp: Path, base: Path) -> Path:
    out = shutil.copytree(_good(tmp, base), tmp / "malformed")
    (out / "adapter_config.json").write_text("{not json")
    return out


def _pickle_bin(tmp: Path, base: Path) -> Path:
    out = shutil.copytree(_good(tmp, base), tmp / "pickled")
    (out / "adapter_model.safetensors").unlink()
    (out / "adapter_model.bin").write_bytes(pickle.dumps(_Exploit()))
    return out


def _pickle_as_safetensors(tmp: Path, base: Path) -> Path:
    out = shutil.copytree(_good(tmp, base), tmp / "sneaky")
    (out / "adapter_model.safetensors").write_bytes(pickle.dumps(_Exploit()))
    return out


def _one_module(out: Path, module: str, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> Path:
    """A hand-written adapter with one LoRA pair on layer 0's `module`."""
    out.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [module]}
    (out / "adapter_config.json").write_text(json.dumps(config))
    prefix = f"base_model.model.model.layers.0.self_attn.{module}"
    tensors = {
        f"{prefix}.lora_A.weight": torch.ones(a_shape),
        f"{prefix}.lora_B.weight": torch.ones(b_shape),
    }
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def _wrong_shape(tmp: Path, base: Path) -> Path:
    return _one_module(tmp / "shape", "q_proj", (4, 100), (64, 4))


def _unknown_module(tmp: Path, base: Path) -> Path:
    return _one_module(tmp / "unknown", "rotary_proj", (4, 64), (64, 4))


def _with_config(tmp: Path, base: Path, name: str, **changes: object) -> Path:
    out = shutil.copytree(_good(tmp, base), tmp / name)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config | changes))
    return out


def _lora_only_bias(tmp: Path, base: Path) -> Path:
    """Served from a directory before the parsers were one; the registry refused it."""
    return _with_config(tmp, base, "bias", bias="lora_only")


def _fan_in_fan_out(tmp: Path, base: Path) -> Path:
    return _with_config(tmp, base, "fifo", fan_in_fan_out=True)


CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "missing": (_missing, "does not exist"),
    "malformed": (_malformed_config, "adapter_config.json is not valid JSON"),
    "pickle-bin": (_pickle_bin, "pickle weights refused (adapter_model.bin)"),
    "pickle-named-safetensors": (_pickle_as_safetensors, "holds pickle bytes, not safetensors"),
    "wrong-shape": (_wrong_shape, "has shape [4, 100], the base model needs [4, 64]"),
    "unknown-module": (_unknown_module, "the base model lacks or that are not served: ['rotary"),
    "lora-only-bias": (_lora_only_bias, "unsupported adapter feature bias training (bias)"),
    "fan-in-fan-out": (_fan_in_fan_out, "unsupported adapter feature fan_in_fan_out"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_adapter_fails_only_its_request(
    case: str, tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    base = tiny_model("llama")
    make, message = CASES[case]
    engine = Engine.from_config(EngineConfig(model=str(base)))
    engine.register_adapter("good", _good(tmp_path, base))
    engine.register_adapter("bad", make(tmp_path, base))
    sampling = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.add_request("base", [5, 6, 7], sampling)
    engine.add_request("with-good", [5, 6, 7], sampling, "good")
    engine.add_request("with-bad", [5, 6, 7], sampling, "bad")
    finals = {}
    while engine.has_unfinished():
        finals.update({e.request_id: e for e in engine.step() if e.finished})
    assert finals["with-bad"].finish_reason is FinishReason.ERROR
    assert message in (finals["with-bad"].error or "")
    assert finals["base"].finish_reason is FinishReason.LENGTH
    assert finals["with-good"].finish_reason is FinishReason.LENGTH
    assert finals["with-good"].completion_tokens == 4
    assert not Path(MARKER).exists()


def test_unknown_adapter_and_empty_prompt_are_refused_at_once(
    tiny_model: Callable[..., Path],
) -> None:
    engine = Engine.from_config(EngineConfig(model=str(tiny_model("llama")), max_model_len=64))
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        engine.add_request("a", [1, 2], SamplingParams(), "nope")
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("b", "", SamplingParams())
    with pytest.raises(ValueError, match="limit is 63"):
        engine.add_request("c", list(range(3, 80)), SamplingParams())
    with pytest.raises(ValueError, match="token ids must be integers"):
        engine.add_request("d", [1, 10**9], SamplingParams())
    assert not engine.has_unfinished()
