"""VeRA is stored as its exact LoRA form: PEFT's VeRA model and PEFT's LoRA model
loaded from our converted blob give the same logits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, VeraConfig, get_peft_model
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from adapter_store.basemodel import BaseModelSpec
from adapter_store.validation import CONFIG_METADATA_KEY, validate_adapter_dir
from tests.adapter_store.conftest import TINY_CONFIG

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def blob_as_peft_dir(blob: bytes, directory: Path) -> Path:
    """Our blob, unpacked into the directory layout PEFT loads."""
    directory.mkdir()
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(blob)
    with safe_open(str(weights), "pt") as f:
        config = json.loads(f.metadata()[CONFIG_METADATA_KEY])
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("targets", [TARGETS, ["v_proj", "down_proj"]])
def test_vera_conversion_is_exact(tmp_path: Path, targets: list[str]) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in TINY_CONFIG.items() if k != "architectures"})
    base = LlamaForCausalLM(config).eval()
    reference = copy.deepcopy(base)
    vera = get_peft_model(base, VeraConfig(r=8, target_modules=targets, save_projection=True))
    with torch.no_grad():
        for name, param in vera.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn_like(param))
    vera.save_pretrained(str(tmp_path / "vera"))
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = vera(tokens).logits

    adapter = validate_adapter_dir(
        tmp_path / "vera", BaseModelSpec.from_config_dict(TINY_CONFIG), 64
    )
    assert adapter.adapter_type == "vera"
    assert adapter.config["lora_alpha"] == adapter.config["r"] == 8
    assert adapter.config["use_rslora"] is False
    lora_dir = blob_as_peft_dir(adapter.encode(), tmp_path / "lora")
    lora = PeftModel.from_pretrained(reference, str(lora_dir)).eval()
    with torch.no_grad():
        actual = lora(tokens).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), lora.disable_adapter():
        assert (lora(tokens).logits - expected).abs().max() > 1e-3  # the adapter matters
