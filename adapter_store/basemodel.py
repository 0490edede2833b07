"""The base model an adapter must fit: architecture and projection shapes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapter_store.quantconfig import QuantizationConfigError, parse_quantization_config

# Llama-family model types that share the q/k/v/o + gate/up/down layout.
# The model types the worker serves (worker.model.config.SUPPORTED_MODEL_TYPES must
# equal this set; a test checks). Qwen3 (q/k norms) is not served yet.
LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2"})

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_MODULES + MLP_MODULES
# Which submodule of a decoder layer holds each projection.
PARENT = {**dict.fromkeys(ATTENTION_MODULES, "self_attn"), **dict.fromkeys(MLP_MODULES, "mlp")}


class BaseModelError(ValueError):
    """The base model's config cannot be read or is not a supported architecture."""


@dataclass(frozen=True)
class BaseModelSpec:
    """The dimensions of a Llama-family base model that adapters must match."""

    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    # How the base's linear weights are stored: None (full precision), nf4, fp4, int8, or
    # another library's method (a pre-quantized checkpoint's config.json says which).
    quantization: str | None = None

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any]) -> BaseModelSpec:
        """Read a HF `config.json` mapping (Llama, Mistral, Qwen2 and friends)."""
        model_type = config.get("model_type")
        if model_type not in LLAMA_FAMILY:
            raise BaseModelError(f"unsupported base model type {model_type!r}")
        try:
            quantization = parse_quantization_config(
                config.get("quantization_config"), "base model config"
            )
        except QuantizationConfigError as exc:
            raise BaseModelError(str(exc)) from exc
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            return cls(
                architecture=str(model_type),
                num_layers=int(config["num_hidden_layers"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                quantization=None if quantization is None else quantization.method,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BaseModelError(f"base model config lacks a usable field: {exc}") from exc

    @classmethod
    def from_hf_dir(cls, path: Path) -> BaseModelSpec:
        """Read `config.json` from a HF model directory."""
        config_path = Path(path) / "config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BaseModelError(f"cannot read base model config {config_path}: {exc}") from exc
        if not isinstance(config, dict):
            raise BaseModelError(f"base model config {config_path} is not a JSON object")
        return cls.from_config_dict(config)

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection, as nn.Linear sees it."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        return shapes[module]

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) for each of the seven projections."""
        return {module: self.module_shape(module) for module in PROJECTIONS}

    @property
    def fingerprint(self) -> str:
        """A stable short sha256 of the architecture, every shape that matters, and the
        quantization of a quantized base (left out when None, so a full-precision base keeps
        the fingerprint recorded before quantization existed)."""
        fields = {k: v for k, v in asdict(self).items() if k != "quantization" or v is not None}
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
