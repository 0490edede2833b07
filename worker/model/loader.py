"""Load a Llama-family checkpoint (a local HF directory of safetensors) into our model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from worker.model.config import ModelConfig, model_config_from_hf
from worker.model.llama import LayerWeights, LlamaModel

# model_type -> model class: every supported family shares one decoder today.
MODEL_CLASSES: dict[str, type[LlamaModel]] = {
    "llama": LlamaModel,
    "mistral": LlamaModel,
    "qwen2": LlamaModel,
}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: float32 on CPU, bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    hf_config = AutoConfig.from_pretrained(str(model_dir))
    config = model_config_from_hf(hf_config)
    tensors = _read_safetensors(model_dir)
    return build_model(config, tensors, device, dtype)


def load_tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(model_dir))


def build_model(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],  # HF parameter names
    device: torch.device,
    dtype: torch.dtype,
) -> LlamaModel:
    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ValueError(f"checkpoint lacks tensor {name!r}")
        return tensors[name].to(device=device, dtype=dtype).contiguous()

    layers = [_layer(config, get, f"model.layers.{i}.", tensors) for i in range(config.num_layers)]
    embed = get("model.embed_tokens.weight")
    tied = config.tie_word_embeddings or "lm_head.weight" not in tensors
    lm_head = embed if tied else get("lm_head.weight")
    cls = MODEL_CLASSES[config.model_type]
    return cls(config, embed, layers, get("model.norm.weight"), lm_head)


def _layer(config: ModelConfig, get: Any, p: str, tensors: dict[str, torch.Tensor]) -> LayerWeights:
    attn, mlp = p + "self_attn.", p + "mlp."
    bias = None
    if config.qkv_bias and attn + "q_proj.bias" in tensors:
        bias = torch.cat([get(attn + f"{m}_proj.bias") for m in "qkv"])
    return LayerWeights(
        input_norm=get(p + "input_layernorm.weight"),
        qkv=torch.cat([get(attn + f"{m}_proj.weight") for m in "qkv"]),
        qkv_bias=bias,
        o=get(attn + "o_proj.weight"),
        post_norm=get(p + "post_attention_layernorm.weight"),
        gate_up=torch.cat([get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")]),
        down=get(mlp + "down_proj.weight"),
    )


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[name] = f.get_tensor(name)
    return tensors
