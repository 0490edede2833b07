"""Random PEFT LoRA adapters, written by PEFT itself so the format is the real one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(
    base_dir: Path,
    out: Path,
    *,
    r: int,
    alpha: float,
    targets: list[str] | None = None,
    seed: int = 0,
    std: float = 0.05,
    **lora_kwargs: Any,
) -> Path:
    """Save a LoRA with random non-zero A and B (PEFT initializes B to zero)."""
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets or ALL_MODULES,
        lora_dropout=0.0,
        **lora_kwargs,
    )
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(str(out), safe_serialization=True)
    return out
