"""One adapter parser: an adapter means the same from its directory, its blob, and PEFT.

The worker reads adapters through adapter_store.validation, the registry's parser.
Before that, the two disagreed: the blob's config had its pattern keys sorted (PEFT
and the worker take the first matching key), the worker assumed lora_alpha = r when
the config omitted it (PEFT defaults to 8), and the worker refused valid files whose
header length is 128 mod 256 as pickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapter_store.basemodel import LLAMA_FAMILY, BaseModelSpec
from adapter_store.validation import WEIGHTS_FILE, validate_adapter_dir
from tests.adapter_store.headers import BASE_LENGTH, with_header_length
from tests.worker.adapters import make_adapter
from worker.config import EngineConfig
from worker.engine import Engine
from worker.model.config import SUPPORTED_MODEL_TYPES
from worker.sequence import SamplingParams

PROMPTS = [[5, 17, 300, 4000, 12], [9, 8, 7, 6, 5, 4]]
NEW_TOKENS = 6
# PEFT configs the registry accepts, including pattern keys that overlap (a general key
# before a specific one: PEFT applies the general one) and keys in no sorted order.
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": dict(r=4, alpha=16),
    "rslora": dict(r=8, alpha=8, use_rslora=True),
    "overlapping-patterns": dict(
        r=4,
        alpha=8,
        rank_pattern={"o_proj": 8, "model.layers.1.self_attn.o_proj": 2},
        alpha_pattern={"q_proj": 32, "model.layers.0.self_attn.q_proj": 1},
    ),
    "unordered-patterns": dict(
        r=4,
        alpha=8,
        rank_pattern={"up_proj": 2, "k_proj": 8, "gate_proj": 6},
        alpha_pattern={"v_proj": 3, "down_proj": 40, "gate_proj": 0.5},
    ),
    "subset": dict(r=6, alpha=12, targets=["q_proj", "v_proj", "down_proj"]),
}


def with_patterns_in_given_order(directory: Path, case: dict[str, Any]) -> Path:
    """Write the patterns back in the order the adapter was built with.

    PEFT's save_pretrained sorts the config's keys, while its tensors were shaped by the
    in-memory order; with overlapping rank_pattern keys PEFT cannot reload its own
    directory. A config written by hand or another tool keeps its order, as here.
    """
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    for key in ("rank_pattern", "alpha_pattern"):
        config[key] = case.get(key, {})
    path.write_text(json.dumps(config))
    return directory


def peft_tokens(base: Path, adapter: Path) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, str(adapter)).eval()
    out = []
    with torch.no_grad():
        for ids in PROMPTS:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
            out.append(gen[0, len(ids) :].tolist())
    return out


def blob_of(directory: Path, base: Path, out: Path) -> Path:
    """What an upload stores: the validated adapter's canonical blob bytes."""
    spec = BaseModelSpec.from_hf_dir(base)
    out.write_bytes(validate_adapter_dir(directory, spec, max_rank=64).encode())
    return out


def engine_tokens(base: Path, sources: dict[str, Path]) -> dict[str, list[list[int]]]:
    engine = Engine.from_config(EngineConfig(model=str(base)))
    for name, path in sources.items():
        engine.register_adapter(name, path)
    names = [n for n in sources for _ in PROMPTS]
    results = engine.generate(PROMPTS * len(sources), SamplingParams(max_tokens=NEW_TOKENS), names)
    errors = [r.error for r in results if r.error]
    assert not errors, errors
    by_name: dict[str, list[list[int]]] = {n: [] for n in sources}
    for name, result in zip(names, results, strict=True):
        by_name[name].append(result.token_ids)
    return by_name


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_directory_blob_and_peft_agree(
    case: str, tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    base = tiny_model("llama")
    directory = make_adapter(base, tmp_path / case, std=0.3, **CONFIGS[case])
    with_patterns_in_given_order(directory, CONFIGS[case])
    blob = blob_of(directory, base, tmp_path / "blob.safetensors")
    got = engine_tokens(base, {"dir": directory, "blob": blob})
    want = peft_tokens(base, directory)
    assert got["dir"] == want
    assert got["blob"] == want


def test_missing_lora_alpha_defaults_like_peft(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    """PEFT's LoraConfig defaults lora_alpha to 8; r = 2 makes that a scale of 4, not 1."""
    base = tiny_model("llama")
    directory = make_adapter(base, tmp_path / "no-alpha", r=2, alpha=8, std=0.3)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["lora_alpha"]
    config_path.write_text(json.dumps(config))
    blob = blob_of(directory, base, tmp_path / "blob.safetensors")
    got = engine_tokens(base, {"dir": directory, "blob": blob})
    want = peft_tokens(base, directory)
    assert got["dir"] == want
    assert got["blob"] == want


def test_header_length_128_mod_256_is_served(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    base = tiny_model("llama")
    directory = make_adapter(base, tmp_path / "a", r=4, alpha=8, std=0.3)
    with_header_length(directory / WEIGHTS_FILE, BASE_LENGTH + 128)
    blob = blob_of(directory, base, tmp_path / "blob.safetensors")
    with_header_length(blob, BASE_LENGTH + 128)
    got = engine_tokens(base, {"dir": directory, "blob": blob})
    assert got["dir"] == got["blob"] == peft_tokens(base, directory)


def test_registry_accepts_exactly_the_model_families_the_worker_serves() -> None:
    assert set(SUPPORTED_MODEL_TYPES) == set(LLAMA_FAMILY)
