"""LoRA adapters as the engine holds them: per (layer, module) A [in, r], B [r, out], scale.

Sources: a PEFT directory (adapter_config.json + adapter_model.safetensors) or a
registry blob (one safetensors file whose metadata carries the normalized config
under "lorapool.adapter_config"). Weights are read with safetensors only; pickle
files are refused by name, never opened.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from worker.kernels.lora_ref import ExpandPart
from worker.model.config import FUSED_GROUPS, ModelConfig
from worker.model.forward_batch import FusedLora

BLOB_CONFIG_KEY = "lorapool.adapter_config"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_TENSOR = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
_BLOCK = {m: "self_attn" for m in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
    m: "mlp" for m in ("gate_proj", "up_proj", "down_proj")
}
# Features we do not serve yet, each refused by name: config key -> description.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "added/trainable tokens",
}


class AdapterLoadError(ValueError):
    """The adapter cannot be served on this model; the message names the problem."""


@dataclass
class LoraAdapter:
    adapter_id: str
    rank: int  # the largest rank over its modules
    groups: dict[tuple[int, str], FusedLora]  # (layer, fused group) -> weights
    nbytes: int

    def fused(self, layer: int, group: str) -> FusedLora | None:
        return self.groups.get((layer, group))


def load_adapter(
    adapter_id: str,
    source: Path,
    model: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_rank: int,
) -> LoraAdapter:
    """Read, check against the model and convert one adapter. Raises AdapterLoadError."""
    weights_path, config = _locate(source)
    tensors = _read_tensors(weights_path)
    return _build(adapter_id, config, tensors, model, device, dtype, max_rank)


def _locate(source: Path) -> tuple[Path, dict[str, Any]]:
    if source.is_file():
        _sniff(source)
        return source, _blob_config(source)
    if not source.is_dir():
        raise AdapterLoadError(f"adapter path {source} does not exist")
    for name in PICKLE_NAMES:
        if (source / name).exists():
            raise AdapterLoadError(
                f"{name} holds pickle weights, which are refused; save the adapter as safetensors"
            )
    config_path = source / "adapter_config.json"
    weights = source / "adapter_model.safetensors"
    if not config_path.is_file():
        raise AdapterLoadError(f"adapter directory {source} has no adapter_config.json")
    if not weights.is_file():
        raise AdapterLoadError(f"adapter directory {source} has no adapter_model.safetensors")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"adapter_config.json is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterLoadError("adapter_config.json must hold a JSON object")
    _sniff(weights)
    return weights, config


def _blob_config(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise AdapterLoadError(f"{path.name} is not a valid safetensors file: {exc}") from exc
    if BLOB_CONFIG_KEY not in meta:
        raise AdapterLoadError(f"{path.name} carries no {BLOB_CONFIG_KEY} metadata")
    config = json.loads(meta[BLOB_CONFIG_KEY])
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{BLOB_CONFIG_KEY} metadata must be a JSON object")
    return config


def _sniff(path: Path) -> None:
    """Refuse pickle or torch zip archives saved under a safetensors name."""
    with path.open("rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise AdapterLoadError(f"{path.name} holds pickle data, not safetensors; refused")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise AdapterLoadError(f"{path.name} is not a valid safetensors file: {exc}") from exc


def _build(
    adapter_id: str,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    model: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_rank: int,
) -> LoraAdapter:
    _check_config(config)
    shapes = model.projection_shapes()
    pairs = _pair_tensors(tensors, shapes, model.num_layers)
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), (lora_a, lora_b) in pairs.items():
        rank = _check_shapes(layer, module, lora_a, lora_b, shapes[module], max_rank)
        if not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
            raise AdapterLoadError(f"layer {layer} {module} has non-finite weights")
        scale = _scale(config, layer, module, rank)
        # A as [r, in] (PEFT's layout); the scale folded into B as [r, out]: y += (x Aᵀ)(s B).
        modules[(layer, module)] = (lora_a.double(), lora_b.t().double() * scale)
    groups = {
        (layer, group): fused
        for layer in range(model.num_layers)
        for group in FUSED_GROUPS
        if (fused := _fuse(modules, layer, group, model, device, dtype)) is not None
    }
    nbytes = sum(g.a.nbytes + sum(p.b.nbytes for p in g.parts) for g in groups.values())
    top_rank = max(a.shape[0] for a, _ in modules.values())
    return LoraAdapter(adapter_id, top_rank, groups, nbytes)


def _fuse(
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    layer: int,
    group: str,
    model: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> FusedLora | None:
    """Stacked A of the group's targeted projections, and one expand part each."""
    a_list, parts, rank_start = [], [], 0
    for module, out_cols in model.fused_columns(group).items():
        if (layer, module) not in modules:
            continue
        a, b = modules[(layer, module)]
        rank = a.shape[0]
        a_list.append(a)
        b_dev = b.to(device=device, dtype=dtype).contiguous()
        parts.append(ExpandPart(slice(rank_start, rank_start + rank), out_cols, b_dev))
        rank_start += rank
    if not a_list:
        return None
    a_cat = torch.cat(a_list, dim=0).to(device=device, dtype=dtype).contiguous()
    return FusedLora(a_cat, tuple(parts))


def _check_config(config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterLoadError(f"adapter type {peft_type!r} is not served (only LORA)")
    for key, feature in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterLoadError(f"{feature} is not supported yet")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterLoadError(f"adapter_config.json: 'r' must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", r)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise AdapterLoadError(f"adapter_config.json: 'lora_alpha' must be a number, got {alpha!r}")


def _pair_tensors(
    tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], num_layers: int
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR.match(name)
        if match is None:
            raise AdapterLoadError(f"tensor {name!r} is not a LoRA weight of a decoder layer")
        layer, module, which = int(match[1]), match[3], match[4]
        if module not in shapes:
            raise AdapterLoadError(
                f"target module {module!r} does not exist in the base model "
                f"(LoRA-able: {', '.join(shapes)})"
            )
        if layer >= num_layers:
            raise AdapterLoadError(
                f"tensor {name!r} names layer {layer}; the model has {num_layers}"
            )
        found.setdefault((layer, module), {})[which] = tensor
    if not found:
        raise AdapterLoadError("adapter has no LoRA weights for any module of the base model")
    pairs = {}
    for key, entry in found.items():
        if set(entry) != {"A", "B"}:
            raise AdapterLoadError(f"layer {key[0]} {key[1]} lacks its lora_A or lora_B weight")
        pairs[key] = (entry["A"], entry["B"])
    return pairs


def _check_shapes(
    layer: int,
    module: str,
    lora_a: torch.Tensor,  # [r, in]
    lora_b: torch.Tensor,  # [out, r]
    shape: tuple[int, int],
    max_rank: int,
) -> int:
    in_features, out_features = shape
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise AdapterLoadError(f"layer {layer} {module}: LoRA weights must be matrices")
    rank = lora_a.shape[0]
    if lora_a.shape[1] != in_features or lora_b.shape != (out_features, rank):
        raise AdapterLoadError(
            f"layer {layer} {module}: shapes A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} "
            f"do not fit the model (expected A [r, {in_features}], B [{out_features}, r])"
        )
    if rank > max_rank:
        raise AdapterLoadError(
            f"layer {layer} {module}: rank {rank} exceeds the maximum {max_rank}"
        )
    if not lora_a.dtype.is_floating_point:
        raise AdapterLoadError(f"layer {layer} {module}: dtype {lora_a.dtype} is not a float type")
    return int(rank)


def _scale(config: dict[str, Any], layer: int, module: str, rank: int) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA; patterns per module."""
    key = f"model.layers.{layer}.{_BLOCK[module]}.{module}"
    alpha = float(config.get("lora_alpha", config["r"]))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            alpha = float(value)
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
