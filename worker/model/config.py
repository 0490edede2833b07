"""The model shape we serve, normalized from a HF config (Llama, Mistral, Qwen2, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from adapter_store.basemodel import BaseModelSpec

# model_type -> whether q/k/v projections carry a bias. A table, not a chain of ifs;
# a model_type missing here is refused by name. The registry accepts exactly these
# (adapter_store.basemodel.LLAMA_FAMILY; a test keeps the two equal).
SUPPORTED_MODEL_TYPES: dict[str, bool] = {
    "llama": False,
    "mistral": False,
    "qwen2": True,
}


# The model runs projections that share an input as one fused matmul; LoRA follows.
FUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None  # attend to at most this many latest positions (Mistral)
    inv_freq: torch.Tensor  # [head_dim / 2] RoPE frequencies after the config's scaling
    rope_attention_scaling: float  # cos/sin multiplier (1.0 except YaRN-style scalings)
    quantization: str | None = None  # how the projections are stored: None, nf4, fp4, int8

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def spec(self) -> BaseModelSpec:
        """The shape adapters must fit, in the registry's terms (one projection-shape table)."""
        return BaseModelSpec(
            architecture=self.model_type,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            quantization=self.quantization,
        )

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear projection a LoRA may target."""
        return self.spec.module_shapes()

    def fused_columns(self, group: str) -> dict[str, slice]:
        """Columns of each projection inside its group's fused output."""
        shapes = self.projection_shapes()
        columns, start = {}, 0
        for module in FUSED_GROUPS[group]:
            out = shapes[module][1]
            columns[module] = slice(start, start + out)
            start += out
        return columns


def model_config_from_hf(hf: Any) -> ModelConfig:
    """Normalize a transformers PretrainedConfig; unknown architectures fail by name."""
    if hf.model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise ValueError(f"model_type {hf.model_type!r} is not supported (supported: {supported})")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    inv_freq, attention_scaling = _rope(hf, head_dim)
    eos = hf.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ModelConfig(
        model_type=hf.model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=hf.rms_norm_eps,
        qkv_bias=SUPPORTED_MODEL_TYPES[hf.model_type] or bool(getattr(hf, "attention_bias", False)),
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        max_position_embeddings=hf.max_position_embeddings,
        eos_token_ids=eos_ids,
        sliding_window=_sliding_window(hf),
        inv_freq=inv_freq,
        rope_attention_scaling=attention_scaling,
    )


def _sliding_window(hf: Any) -> int | None:
    """Mistral sets sliding_window; Qwen2 only when use_sliding_window is on."""
    if hf.model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
        return None
    window = getattr(hf, "sliding_window", None)
    return int(window) if window else None


def _rope(hf: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(hf, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (theta**exponents), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    return inv_freq.float(), float(scaling)
