"""Builders of PEFT-layout adapter directories for tests (random tensors, tweakable)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adapter_store.basemodel import PARENT, BaseModelSpec


def lora_key(layer: int, module: str, part: str) -> str:
    return f"base_model.model.model.layers.{layer}.{PARENT[module]}.{module}.lora_{part}.weight"


def lora_tensors(
    base: BaseModelSpec,
    r: int = 4,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    ranks: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """lora_A [r, in] and lora_B [out, r] for each target in each layer."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(base.num_layers):
        for module in targets:
            rank = (ranks or {}).get(module, r)
            n_in, n_out = base.module_shape(module)
            tensors[lora_key(layer, module, "A")] = torch.randn(rank, n_in, generator=generator).to(
                dtype
            )
            tensors[lora_key(layer, module, "B")] = torch.randn(
                n_out, rank, generator=generator
            ).to(dtype)
    return tensors


def lora_config(
    r: int = 4, targets: Iterable[str] = ("q_proj", "v_proj"), **extra: Any
) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "use_rslora": False,
        "target_modules": list(targets),
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "modules_to_save": None,
        "bias": "none",
        **extra,
    }


def write_adapter(
    directory: Path,
    config: dict[str, Any] | str,
    tensors: dict[str, torch.Tensor] | None,
) -> Path:
    """Write adapter_config.json (a dict, or raw text) and adapter_model.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (directory / "adapter_config.json").write_text(text)
    if tensors is not None:
        save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def write_lora(directory: Path, base: BaseModelSpec, seed: int = 0, **config: Any) -> Path:
    """A valid LoRA adapter directory."""
    r = config.pop("r", 4)
    targets = config.pop("targets", ("q_proj", "v_proj"))
    return write_adapter(
        directory, lora_config(r, targets, **config), lora_tensors(base, r, targets, seed=seed)
    )
