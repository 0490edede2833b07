"""Load a Llama-family checkpoint (a local HF directory of safetensors) into our model.

The base projections come out dense, quantized at load (`quantize` = nf4 | fp4 | int8), or
read as stored when the checkpoint is already bitsandbytes-quantized (its config.json's
`quantization_config`). Every projection is built alone, then q/k/v and gate/up are fused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from adapter_store.quantconfig import BaseQuantization, parse_quantization_config
from worker.model.config import ModelConfig, model_config_from_hf
from worker.model.linear import DenseLinear, Linear, fuse
from worker.model.llama import LayerWeights, LlamaModel
from worker.model.quant import (
    NotQuantizableError,
    Quantization,
    compute_dtype,
    quant_kind,
)

log = logging.getLogger(__name__)

# model_type -> model class: every supported family shares one decoder today.
MODEL_CLASSES: dict[str, type[LlamaModel]] = {
    "llama": LlamaModel,
    "mistral": LlamaModel,
    "qwen2": LlamaModel,
}
# (module path, bias [out] or None) -> one projection.
MakeLinear = Callable[[str, torch.Tensor | None], Linear]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: float32 on CPU, bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    quantize: str | None = None,
    compute: str = "auto",
) -> LlamaModel:
    """The model in `dtype` on `device`; projections quantized as asked or as stored."""
    hf_config = AutoConfig.from_pretrained(str(model_dir))
    stored = parse_quantization_config(
        _as_dict(getattr(hf_config, "quantization_config", None)), f"{model_dir}/config.json"
    )
    quantization = plan_quantization(stored, quantize, compute, dtype)
    config = model_config_from_hf(hf_config)
    name = None if quantization is None else quantization.name
    config = dataclasses.replace(config, quantization=name)
    model = build_model(
        config, _read_safetensors(model_dir), device, dtype, quantization, stored is not None
    )
    log.info("%s", describe(model, quantization))
    return model


def plan_quantization(
    stored: BaseQuantization | None, quantize: str | None, compute: str, dtype: torch.dtype
) -> Quantization | None:
    """What the projections become: as asked (`quantize`), or as the checkpoint stores them."""
    if stored is not None and not stored.is_bitsandbytes:
        raise NotQuantizableError(
            f"the checkpoint is quantized with {stored.method}; bitsandbytes cannot quantize "
            f"it again: serve a full-precision checkpoint"
        )
    if stored is not None and quantize not in (None, stored.method):
        raise NotQuantizableError(
            f"the checkpoint is stored as {stored.method}; it cannot be re-quantized to "
            f"{quantize}: drop --quantize or serve a full-precision checkpoint"
        )
    name = quantize if stored is None else stored.method
    if name is None:
        return None
    kind = quant_kind(name)
    if compute == "auto" and stored is not None and stored.compute_dtype is not None:
        compute = stored.compute_dtype  # the checkpoint's own, unless one is asked for
    double = stored is not None and stored.double_quant
    return Quantization(kind, compute_dtype(compute, dtype), double_quant=double)


def load_tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(model_dir))


def build_model(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],  # HF parameter names
    device: torch.device,
    dtype: torch.dtype,
    quantization: Quantization | None = None,
    prequantized: bool = False,  # tensors hold bitsandbytes codes (a quantized checkpoint)
) -> LlamaModel:
    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ValueError(f"checkpoint lacks tensor {name!r}")
        return tensors[name].to(device=device, dtype=dtype).contiguous()

    make = _linear_maker(tensors, get, device, quantization, prequantized)
    layers = [
        _layer(config, tensors, get, make, f"model.layers.{i}.") for i in range(config.num_layers)
    ]
    embed = get("model.embed_tokens.weight")
    tied = config.tie_word_embeddings or "lm_head.weight" not in tensors
    lm_head = embed if tied else get("lm_head.weight")  # never quantized (as in transformers)
    cls = MODEL_CLASSES[config.model_type]
    return cls(config, embed, layers, get("model.norm.weight"), lm_head)


def _linear_maker(
    tensors: dict[str, torch.Tensor],
    get: Callable[[str], torch.Tensor],
    device: torch.device,
    quantization: Quantization | None,
    prequantized: bool,
) -> MakeLinear:
    if quantization is None:
        return lambda name, bias: DenseLinear(get(f"{name}.weight"), bias)
    # bitsandbytes is needed only here: a host without it still serves dense models.
    from worker.model import quant_bnb

    q = quantization
    if prequantized:
        return lambda name, bias: quant_bnb.read_quantized(tensors, name, bias, q, device)
    return lambda name, bias: quant_bnb.quantize(name, get(f"{name}.weight"), bias, q)


def _layer(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    get: Callable[[str], torch.Tensor],
    make: MakeLinear,
    p: str,
) -> LayerWeights:
    attn, mlp = p + "self_attn.", p + "mlp."
    with_bias = config.qkv_bias and attn + "q_proj.bias" in tensors
    qkv = [
        make(attn + m, get(f"{attn}{m}.bias") if with_bias else None)
        for m in ("q_proj", "k_proj", "v_proj")
    ]
    return LayerWeights(
        input_norm=get(p + "input_layernorm.weight"),
        qkv=fuse(qkv),
        o=make(attn + "o_proj", None),
        post_norm=get(p + "post_attention_layernorm.weight"),
        gate_up=fuse([make(mlp + "gate_proj", None), make(mlp + "up_proj", None)]),
        down=make(mlp + "down_proj", None),
    )


def weight_bytes(model: LlamaModel) -> int:
    """Bytes of the base model's weights on its device (a tied lm_head counted once)."""
    tensors = [model.embed, model.norm]
    if model.lm_head is not model.embed:
        tensors.append(model.lm_head)
    total = sum(t.nbytes for t in tensors)
    for layer in model.layers:
        linears = (layer.qkv, layer.o, layer.gate_up, layer.down)
        total += layer.input_norm.nbytes + layer.post_norm.nbytes + sum(x.nbytes for x in linears)
    return total


def describe(model: LlamaModel, quantization: Quantization | None) -> str:
    """The memory report's log line: the weights' bytes on the device and how stored."""
    how = (
        "dense"
        if quantization is None
        else f"{quantization.name}, compute {str(quantization.compute_dtype).removeprefix('torch.')}"
    )
    mib = weight_bytes(model) / 2**20
    return (
        f"base model weights on {model.device}: {mib:.1f} MiB "
        f"(projections {how}; embeddings, norms and lm_head {str(model.dtype).removeprefix('torch.')})"
    )


def _as_dict(value: Any) -> Any:
    """transformers may hand the quantization config back as an object."""
    return value.to_dict() if hasattr(value, "to_dict") else value


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


def eos_ids(config: ModelConfig, tokenizer: Any) -> frozenset[int]:
    """Every token id that ends generation: the config's, the tokenizer's, and the
    model directory's generation_config.json."""
    ids = set(config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    path = Path(getattr(tokenizer, "name_or_path", "")) / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return frozenset(ids)
