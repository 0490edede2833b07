"""Fixtures for worker tests: the packaged SmolLM2, tiny random models, random PEFT adapters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from worker.config import EngineConfig, default_cache_dir
from worker.engine import Engine
from worker.model.source import DEFAULT_MODEL, resolve_model_dir

torch.set_num_threads(2)

TINY: dict[str, Callable[..., Any]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return resolve_model_dir(DEFAULT_MODEL, default_cache_dir())


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_dir: Path) -> Engine:
    return Engine.from_config(EngineConfig(model=str(smollm2_dir)))


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


def tiny_config(model_type: str, **overrides: Any) -> Any:
    fields: dict[str, Any] = dict(
        vocab_size=49152,  # the SmolLM2 tokenizer's, so tiny models can detokenize
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=2,
        bos_token_id=1,
        tie_word_embeddings=model_type == "qwen2",
    )
    fields.update(overrides)
    return TINY[model_type](**fields)


def save_tiny(
    tmp: Path, smollm2_dir: Path, model_type: str, seed: int = 0, **overrides: Any
) -> Path:
    """A random tiny HF model (with the SmolLM2 tokenizer) saved as safetensors."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():  # larger weights than the init so logits are far from ties
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    out = tmp / f"tiny-{model_type}-{seed}"
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(smollm2_dir)).save_pretrained(str(out))
    return out


@pytest.fixture
def tiny_model(tmp_path: Path, smollm2_dir: Path) -> Callable[..., Path]:
    def make(model_type: str = "llama", seed: int = 0, **overrides: Any) -> Path:
        return save_tiny(tmp_path, smollm2_dir, model_type, seed, **overrides)

    return make
