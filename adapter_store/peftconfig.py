"""adapter_config.json parsed, type-checked and normalized (LoRA and VeRA)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from adapter_store.basemodel import PARENT, PROJECTIONS, BaseModelSpec
from adapter_store.errors import (
    AdapterConfigError,
    RankTooLargeError,
    UnknownTargetModuleError,
    UnsupportedFeatureError,
)
from adapter_store.quantconfig import (
    BaseQuantization,
    QuantizationConfigError,
    parse_quantization_config,
)

SUPPORTED_TYPES = ("LORA", "VERA")
PEFT_DEFAULT_LORA_ALPHA = 8


def _truthy(value: Any) -> bool:
    return bool(value)


def _trains_bias(value: Any) -> bool:
    return value not in (None, "none")


def _no_projection(value: Any) -> bool:
    return value is False


# (config key, predicate on its value, the feature's name): configs we refuse, by name.
UNSUPPORTED: dict[str, tuple[tuple[str, Callable[[Any], bool], str], ...]] = {
    "LORA": (
        ("use_dora", _truthy, "DoRA (use_dora)"),
        ("modules_to_save", _truthy, "modules_to_save"),
        ("trainable_token_indices", _truthy, "added tokens (trainable_token_indices)"),
        ("lora_bias", _truthy, "LoRA bias (lora_bias)"),
        ("bias", _trains_bias, "bias training (bias)"),
        ("layer_replication", _truthy, "layer_replication"),
        ("alora_invocation_tokens", _truthy, "aLoRA (alora_invocation_tokens)"),
        ("use_qalora", _truthy, "QA-LoRA (use_qalora)"),
        ("use_bdlora", _truthy, "BD-LoRA (use_bdlora)"),
        ("target_parameters", _truthy, "target_parameters"),
        ("fan_in_fan_out", _truthy, "fan_in_fan_out"),
    ),
    "VERA": (
        ("modules_to_save", _truthy, "modules_to_save"),
        ("bias", _trains_bias, "bias training (bias)"),
        ("fan_in_fan_out", _truthy, "fan_in_fan_out"),
        ("save_projection", _no_projection, "VeRA without saved projections (save_projection)"),
    ),
}


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT config that decide how an adapter is applied."""

    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: frozenset[str]
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    # The base quantization it was trained on, when adapter_config.json's
    # `quantization_config` says (e.g. QLoRA's NF4); None: not recorded.
    base_quantization: BaseQuantization | None = None

    def rank_for(self, module_path: str) -> int:
        """The rank PEFT gives `module_path` (e.g. model.layers.3.self_attn.q_proj)."""
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, module_path), self.r)

    def alpha_for(self, module_path: str) -> float:
        return self.alpha_pattern.get(
            _pattern_key(self.alpha_pattern, module_path), self.lora_alpha
        )

    def scale_for(self, module_path: str) -> float:
        """PEFT's scale s of `module_path` in y += s·(x A)B: alpha/r, or alpha/√r with rsLoRA.

        The one place the LoRA scale is computed (serving and merging both call it).
        Pattern keys are tried in the config's own order, first match wins, as in PEFT.
        """
        rank = self.rank_for(module_path)
        alpha = self.alpha_for(module_path)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_key(patterns: Mapping[str, Any], module_path: str) -> str:
    # PEFT's get_pattern_key: first key matching a dotted suffix of the module name.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return module_path


def module_path(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{PARENT[module]}.{module}"


def parse_adapter_config(text: str, base: BaseModelSpec, max_rank: int) -> AdapterConfig:
    """Parse adapter_config.json text; refuse malformed, oversized or unsupported configs."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterConfigError(f"adapter_config.json is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise AdapterConfigError("adapter_config.json is not a JSON object")
    peft_type = raw.get("peft_type")
    if peft_type not in SUPPORTED_TYPES:
        raise UnsupportedFeatureError(f"adapter type {peft_type!r}", "LORA and VERA are served")
    for key, applies, feature in UNSUPPORTED[peft_type]:
        if applies(raw.get(key)):
            raise UnsupportedFeatureError(feature, f"{key}={raw.get(key)!r}")
    r = _positive_int(raw.get("r"), "r")
    is_lora = peft_type == "LORA"
    config = AdapterConfig(
        peft_type=peft_type,
        r=r,
        lora_alpha=_number(raw.get("lora_alpha", PEFT_DEFAULT_LORA_ALPHA), "lora_alpha")
        if is_lora
        else float(r),
        use_rslora=_bool(raw.get("use_rslora", False), "use_rslora") if is_lora else False,
        target_modules=_targets(raw.get("target_modules"), base),
        rank_pattern=_pattern(raw.get("rank_pattern"), "rank_pattern", _positive_int),
        alpha_pattern=_pattern(raw.get("alpha_pattern"), "alpha_pattern", _number),
        base_model_name_or_path=_optional_str(raw.get("base_model_name_or_path")),
        base_quantization=_base_quantization(raw.get("quantization_config")),
    )
    _check_ranks(config, max_rank)
    return config


def _positive_int(value: Any, what: str) -> int:
    if value is None:
        raise AdapterConfigError(f"adapter_config.json: {what} is missing")
    if type(value) is not int:
        raise AdapterConfigError(f"adapter_config.json: {what} must be an integer, got {value!r}")
    if value <= 0:
        raise AdapterConfigError(f"adapter_config.json: {what} must be positive, got {value}")
    return value


def _number(value: Any, what: str) -> float:
    if type(value) not in (int, float) or value != value or value <= 0:
        raise AdapterConfigError(f"adapter_config.json: {what} must be a positive number")
    return float(value)


def _bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise AdapterConfigError(f"adapter_config.json: {what} must be true or false")
    return value


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _base_quantization(value: Any) -> BaseQuantization | None:
    try:
        return parse_quantization_config(value, "adapter_config.json")
    except QuantizationConfigError as exc:
        raise AdapterConfigError(str(exc)) from exc


def _pattern(value: Any, what: str, check: Callable[[Any, str], Any]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterConfigError(f"adapter_config.json: {what} must be an object")
    for key in value:
        try:
            re.compile(key)
        except re.error as exc:
            raise AdapterConfigError(f"adapter_config.json: bad {what} key {key!r}") from exc
    return {str(k): check(v, f"{what}[{k!r}]") for k, v in value.items()}


def _targets(value: Any, base: BaseModelSpec) -> frozenset[str]:
    if value == "all-linear":
        return frozenset(PROJECTIONS)
    if isinstance(value, str):
        return _regex_targets(value, base)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise AdapterConfigError(
            "adapter_config.json: target_modules must be a non-empty list of names or a regex"
        )
    short = {name.rsplit(".", 1)[-1] for name in value}
    unknown = sorted(short - set(PROJECTIONS))
    if unknown:
        raise UnknownTargetModuleError(
            f"target modules the base model lacks or that are not served: {unknown}; "
            f"served: {list(PROJECTIONS)}"
        )
    return frozenset(short)


def _regex_targets(pattern: str, base: BaseModelSpec) -> frozenset[str]:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise AdapterConfigError(f"adapter_config.json: bad target_modules regex: {exc}") from exc
    found = {
        module
        for layer in range(base.num_layers)
        for module in PROJECTIONS
        if regex.fullmatch(module_path(layer, module))
    }
    if not found:
        raise UnknownTargetModuleError(
            f"target_modules regex {pattern!r} matches no module of the base model"
        )
    return frozenset(found)


def _check_ranks(config: AdapterConfig, max_rank: int) -> None:
    if config.r > max_rank:
        raise RankTooLargeError(f"rank r={config.r} exceeds the maximum rank {max_rank}")
    for key, rank in config.rank_pattern.items():
        if rank > max_rank:
            raise RankTooLargeError(
                f"rank_pattern[{key!r}]={rank} exceeds the maximum rank {max_rank}"
            )
