"""Validation accepts served LoRA layouts and normalizes them canonically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapter_store.basemodel import BaseModelSpec
from adapter_store.validation import CONFIG_METADATA_KEY, validate_adapter_dir
from tests.adapter_store.builders import (
    lora_config,
    lora_key,
    lora_tensors,
    write_adapter,
    write_lora,
)

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_accepts_lora_in_each_dtype(
    tmp_path: Path, tiny_base: BaseModelSpec, dtype: torch.dtype
) -> None:
    tensors = lora_tensors(tiny_base, dtype=dtype)
    write_adapter(tmp_path, lora_config(), tensors)
    adapter = validate_adapter_dir(tmp_path, tiny_base, max_rank=16)
    assert adapter.adapter_type == "lora"
    assert adapter.dtype == str(dtype).removeprefix("torch.")
    assert set(adapter.tensors) == set(tensors)
    assert adapter.config["target_modules"] == ["q_proj", "v_proj"]
    blob = tmp_path / "blob.safetensors"
    blob.write_bytes(adapter.encode())
    with safe_open(str(blob), "pt") as f:
        config = json.loads(f.metadata()[CONFIG_METADATA_KEY])
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor)
    assert config == {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8.0,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": None,
    }


def test_accepts_rslora_rank_and_alpha_patterns(tmp_path: Path, tiny_base: BaseModelSpec) -> None:
    tensors = lora_tensors(tiny_base, r=4, targets=ALL, ranks={"down_proj": 8, "q_proj": 2})
    config = lora_config(
        4,
        ALL,
        use_rslora=True,
        rank_pattern={"down_proj": 8, "q_proj": 2},
        alpha_pattern={"down_proj": 3.0},
    )
    config["target_modules"] = "all-linear"
    write_adapter(tmp_path, config, tensors)
    adapter = validate_adapter_dir(tmp_path, tiny_base, max_rank=8)
    assert adapter.config["use_rslora"] is True
    assert adapter.config["target_modules"] == sorted(ALL)
    assert adapter.module_ranks["model.layers.1.mlp.down_proj"] == 8
    assert adapter.module_ranks["model.layers.0.self_attn.q_proj"] == 2
    assert adapter.module_ranks["model.layers.0.self_attn.k_proj"] == 4


def test_accepts_a_subset_with_adapter_name_segments(
    tmp_path: Path, tiny_base: BaseModelSpec
) -> None:
    tensors = {
        k.replace(".weight", ".default.weight"): v
        for k, v in lora_tensors(tiny_base, targets=("gate_proj",)).items()
    }
    write_adapter(
        tmp_path, lora_config(targets=("model.layers.0.mlp.gate_proj", "gate_proj")), tensors
    )
    adapter = validate_adapter_dir(tmp_path, tiny_base, max_rank=16)
    assert set(adapter.tensors) == {lora_key(i, "gate_proj", p) for i in range(2) for p in "AB"}


def test_regex_target_modules(tmp_path: Path, tiny_base: BaseModelSpec) -> None:
    config = lora_config(targets=())
    config["target_modules"] = r".*\.(q_proj|v_proj)"
    write_adapter(tmp_path, config, lora_tensors(tiny_base))
    assert validate_adapter_dir(tmp_path, tiny_base, 16).config["target_modules"] == [
        "q_proj",
        "v_proj",
    ]


def test_encoding_is_canonical(tmp_path: Path, tiny_base: BaseModelSpec) -> None:
    first = validate_adapter_dir(write_lora(tmp_path / "a", tiny_base), tiny_base, 16)
    tensors = lora_tensors(tiny_base)
    reordered = dict(reversed(list(tensors.items())))
    second_dir = tmp_path / "b"
    second_dir.mkdir()
    save_file(reordered, str(second_dir / "adapter_model.safetensors"), metadata={"x": "y"})
    (second_dir / "adapter_config.json").write_text(json.dumps(lora_config(), indent=4))
    second = validate_adapter_dir(second_dir, tiny_base, 16)
    assert first.encode() == second.encode()


def test_smollm2_shapes() -> None:
    config = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
    }
    spec = BaseModelSpec.from_config_dict(config)
    assert spec.module_shapes() == {
        "q_proj": (576, 576),
        "k_proj": (576, 192),
        "v_proj": (576, 192),
        "o_proj": (576, 576),
        "gate_proj": (576, 1536),
        "up_proj": (576, 1536),
        "down_proj": (1536, 576),
    }
    assert spec.fingerprint == BaseModelSpec.from_config_dict(dict(config)).fingerprint
    assert (
        spec.fingerprint
        != BaseModelSpec.from_config_dict({**config, "num_hidden_layers": 24}).fingerprint
    )
