"""Which quantization a base model was stored or trained in: HF `quantization_config` parsed.

Two places carry one: a base model's `config.json` (a pre-quantized checkpoint) and an
adapter's `adapter_config.json` (the base it was trained on, e.g. QLoRA's NF4 base; PEFT
does not record it itself, so trainers copy the base's `quantization_config` there). Both
are the transformers `BitsAndBytesConfig.to_dict()` shape:

    {"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "nf4",
     "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_use_double_quant": false}
    {"quant_method": "bitsandbytes", "load_in_8bit": true}

Another library's method (gptq, awq, ...) is kept by its name. Torch-free.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BITSANDBYTES = "bitsandbytes"
FOUR_BIT_TYPES = ("nf4", "fp4")  # bnb_4bit_quant_type values
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
METHOD_RE = re.compile(r"\A[a-z0-9][a-z0-9_.-]{0,15}\Z")


class QuantizationConfigError(ValueError):
    """A `quantization_config` that cannot be read; the message names the field."""


@dataclass(frozen=True)
class BaseQuantization:
    """nf4 | fp4 | int8 (bitsandbytes), or another library's quant_method as given."""

    method: str
    compute_dtype: str | None = None  # 4-bit: the dtype bnb dequantized to (float32 unsaid)
    double_quant: bool = False  # 4-bit: absmax quantized again (QLoRA's double quantization)

    @property
    def is_bitsandbytes(self) -> bool:
        return self.method in (*FOUR_BIT_TYPES, "int8")

    def to_config(self) -> dict[str, Any]:
        """The canonical `quantization_config` (what the registry's blob metadata carries)."""
        if self.method == "int8":
            return {"quant_method": BITSANDBYTES, "load_in_8bit": True}
        if self.method not in FOUR_BIT_TYPES:
            return {"quant_method": self.method}
        config: dict[str, Any] = {
            "quant_method": BITSANDBYTES,
            "load_in_4bit": True,
            "bnb_4bit_quant_type": self.method,
            "bnb_4bit_use_double_quant": self.double_quant,
        }
        if self.compute_dtype is not None:
            config["bnb_4bit_compute_dtype"] = self.compute_dtype
        return config


def parse_quantization_config(raw: Any, where: str) -> BaseQuantization | None:
    """A `quantization_config` mapping (or None) → BaseQuantization (or None: not quantized)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise QuantizationConfigError(f"{where}: quantization_config must be an object")
    method = raw.get("quant_method", BITSANDBYTES)  # old transformers wrote no quant_method
    if not isinstance(method, str) or not METHOD_RE.fullmatch(method.lower()):
        raise QuantizationConfigError(f"{where}: bad quantization_config.quant_method {method!r}")
    if method.lower() != BITSANDBYTES:
        return BaseQuantization(method.lower())
    if _flag(raw, "load_in_8bit"):
        return BaseQuantization("int8")
    if not _flag(raw, "load_in_4bit"):
        return None  # a bitsandbytes config that quantizes nothing
    quant_type = raw.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' own default
    if quant_type not in FOUR_BIT_TYPES:
        raise QuantizationConfigError(
            f"{where}: bnb_4bit_quant_type {quant_type!r} is not one of {list(FOUR_BIT_TYPES)}"
        )
    double = raw.get("bnb_4bit_use_double_quant", False)
    if not isinstance(double, bool):
        raise QuantizationConfigError(f"{where}: bnb_4bit_use_double_quant must be true or false")
    return BaseQuantization(quant_type, _compute_dtype(raw, where), double)


def _flag(raw: Mapping[str, Any], key: str) -> bool:
    # transformers writes both `load_in_4bit` and the private `_load_in_4bit`.
    return bool(raw.get(key) or raw.get(f"_{key}"))


def _compute_dtype(raw: Mapping[str, Any], where: str) -> str:
    value = raw.get("bnb_4bit_compute_dtype")
    if value is None:
        return "float32"  # transformers' default (BitsAndBytesConfig leaves it out then)
    name = str(value).removeprefix("torch.")
    if name not in COMPUTE_DTYPES:
        raise QuantizationConfigError(
            f"{where}: bnb_4bit_compute_dtype {value!r} is not one of {list(COMPUTE_DTYPES)}"
        )
    return name


def mismatch(trained: BaseQuantization | None, served: str | None) -> str | None:
    """Why serving on `served` (None: full precision) differs from training, or None.

    An adapter that records no quantization is taken as trained on whatever it is served on.
    """
    if trained is None or trained.method == (served or "none"):
        return None
    return f"trained on a {trained.method} base, served on a {served or 'full-precision'} base"
