"""Tensor names and shapes in an uploaded safetensors header, checked against the base model."""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapter_store.basemodel import PARENT, PROJECTIONS, BaseModelSpec
from adapter_store.errors import (
    NoMatchingWeightsError,
    ShapeMismatchError,
    UnknownTargetModuleError,
    UnsupportedFeatureError,
)
from adapter_store.peftconfig import AdapterConfig, module_path
from adapter_store.tensorfile import Header, TensorInfo

_LAYER = r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<module>\w+)\."
# (peft_type) → pattern of a per-module tensor name; `part` is A/B (LoRA) or b/d (VeRA).
MODULE_KEYS = {
    "LORA": re.compile(_LAYER + r"lora_(?P<part>[AB])(?:\.[\w-]+)?\.weight$"),
    "VERA": re.compile(_LAYER + r"vera_lambda_(?P<part>[bd])(?:\.[\w-]+)?$"),
}
PARTS = {"LORA": ("A", "B"), "VERA": ("b", "d")}
VERA_SHARED = ("base_model.vera_A", "base_model.vera_B")
# Substrings of tensor names that betray a feature not served yet.
FEATURE_MARKERS = (
    ("lora_magnitude_vector", "DoRA (lora_magnitude_vector weights)"),
    ("modules_to_save", "modules_to_save (weights saved for whole modules)"),
    ("trainable_tokens", "added tokens (trainable_tokens weights)"),
    ("embed_tokens", "added tokens (embed_tokens weights)"),
    ("lm_head", "lm_head weights"),
)


@dataclass(frozen=True)
class Layout:
    """Tensor names grouped per module: (layer, module) → the module's two tensor names.

    LoRA: (lora_A, lora_B). VeRA: (λ_b, λ_d), with `vera_shared` = (vera_A, vera_B).
    """

    modules: dict[tuple[int, str], tuple[str, str]]
    vera_shared: tuple[str, str] | None


def check_layout(header: Header, config: AdapterConfig, base: BaseModelSpec) -> Layout:
    """Map every tensor to a base-model module and check every shape; read no data."""
    names = set(header.tensors)
    if not names:
        raise NoMatchingWeightsError("the weights file holds no tensors")
    for name in sorted(names):
        for marker, feature in FEATURE_MARKERS:
            if marker in name:
                raise UnsupportedFeatureError(feature, f"tensor {name!r}")
    shared = None
    if config.peft_type == "VERA":
        missing = [n for n in VERA_SHARED if n not in names]
        if missing:
            raise UnsupportedFeatureError(
                "VeRA without saved projections", f"missing tensors {missing}"
            )
        shared = VERA_SHARED
        names -= set(VERA_SHARED)
    modules = _group(names, config, base)
    if not modules:
        raise NoMatchingWeightsError("the weights match no module of the base model")
    if shared is None:
        _check_lora_shapes(header, modules, config, base)
    else:
        _check_vera_shapes(header, modules, shared, config, base)
    return Layout(modules=modules, vera_shared=shared)


def _group(
    names: set[str], config: AdapterConfig, base: BaseModelSpec
) -> dict[tuple[int, str], tuple[str, str]]:
    pattern = MODULE_KEYS[config.peft_type]
    parts: dict[tuple[int, str], dict[str, str]] = {}
    for name in sorted(names):
        match = pattern.match(name)
        if match is None:
            raise NoMatchingWeightsError(f"weight {name!r} matches no module of the base model")
        layer, module = int(match["layer"]), match["module"]
        if module not in PROJECTIONS:
            raise UnknownTargetModuleError(
                f"weight {name!r} targets {module!r}, which is not served"
            )
        if match["parent"] != PARENT[module] or layer >= base.num_layers:
            raise NoMatchingWeightsError(
                f"weight {name!r} matches no module of the base model "
                f"({base.num_layers} layers, {module} lives in {PARENT[module]})"
            )
        if module not in config.target_modules:
            raise NoMatchingWeightsError(f"weight {name!r} is for {module}, not in target_modules")
        parts.setdefault((layer, module), {})[match["part"]] = name
    first, second = PARTS[config.peft_type]
    grouped = {}
    for key, found in parts.items():
        if first not in found or second not in found:
            raise ShapeMismatchError(f"{module_path(*key)} lacks one of its two tensors: {found}")
        grouped[key] = (found[first], found[second])
    return grouped


def _expect(info: TensorInfo, shape: tuple[int, ...], meaning: str) -> None:
    if info.shape != shape:
        raise ShapeMismatchError(
            f"tensor {info.name!r} has shape {list(info.shape)}, the base model needs "
            f"{list(shape)} ({meaning})"
        )


def _check_lora_shapes(
    header: Header,
    modules: dict[tuple[int, str], tuple[str, str]],
    config: AdapterConfig,
    base: BaseModelSpec,
) -> None:
    for (layer, module), (name_a, name_b) in modules.items():
        in_features, out_features = base.module_shape(module)
        rank = config.rank_for(module_path(layer, module))
        _expect(header.tensors[name_a], (rank, in_features), "[rank, in_features]")
        _expect(header.tensors[name_b], (out_features, rank), "[out_features, rank]")


def _check_vera_shapes(
    header: Header,
    modules: dict[tuple[int, str], tuple[str, str]],
    shared: tuple[str, str],
    config: AdapterConfig,
    base: BaseModelSpec,
) -> None:
    vera_a, vera_b = (header.tensors[n] for n in shared)
    used = [base.module_shape(module) for _, module in modules]
    max_in = max(shape[0] for shape in used)
    max_out = max(shape[1] for shape in used)
    if len(vera_a.shape) != 2 or vera_a.shape[0] != config.r or vera_a.shape[1] < max_in:
        _expect(vera_a, (config.r, max_in), "[r, max in_features]")
    if len(vera_b.shape) != 2 or vera_b.shape[1] != config.r or vera_b.shape[0] < max_out:
        _expect(vera_b, (max_out, config.r), "[max out_features, r]")
    for (_, module), (name_b, name_d) in modules.items():
        _expect(header.tensors[name_b], (base.module_shape(module)[1],), "[out_features]")
        _expect(header.tensors[name_d], (config.r,), "[r]")
