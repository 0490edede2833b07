"""Base-model quantization kinds (bitsandbytes), one table for the config, loader and merge.

`--quantize nf4|fp4|int8` stores the base model's linear projections (q, k, v, o, gate, up,
down) quantized; embeddings, norms and the lm_head stay in the model dtype (as transformers
does with `BitsAndBytesConfig`). LoRA deltas are not quantized: ops.lora adds them to each
projection's output in the model dtype. This module needs no bitsandbytes; the layers that
do live in `worker.model.quant_bnb`, imported only when a model is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class UnsupportedQuantizationError(ValueError):
    """A quantization name that is not one of QUANTIZATIONS."""


class NotQuantizableError(ValueError):
    """A model (or one of its layers) that bitsandbytes cannot quantize as asked."""


@dataclass(frozen=True)
class QuantKind:
    name: str
    bits: int
    # Values per absmax block along a weight row (4-bit); None: one scale per row (int8).
    blocksize: int | None
    description: str


QUANTIZATIONS: dict[str, QuantKind] = {
    "nf4": QuantKind("nf4", 4, 64, "4-bit NormalFloat, blocks of 64 (QLoRA)"),
    "fp4": QuantKind("fp4", 4, 64, "4-bit float, blocks of 64"),
    "int8": QuantKind("int8", 8, None, "LLM.int8(): int8 rows, 16-bit outlier columns"),
}


@dataclass(frozen=True)
class Quantization:
    """How the base's projections are stored and computed."""

    kind: QuantKind
    compute_dtype: torch.dtype  # x is cast to it for the quantized matmul; y cast back
    double_quant: bool = False  # 4-bit: absmax itself quantized (a checkpoint may say so)
    int8_threshold: float = 6.0  # LLM.int8(): |x| above it is an outlier column

    @property
    def name(self) -> str:
        return self.kind.name


def quant_kind(name: str) -> QuantKind:
    """The table's entry, or a clear error naming the supported ones."""
    kind = QUANTIZATIONS.get(name)
    if kind is None:
        supported = ", ".join(QUANTIZATIONS)
        raise UnsupportedQuantizationError(
            f"unsupported quantization {name!r}: choose one of {supported} (or none)"
        )
    return kind


def compute_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """auto: the model dtype; else float32, bfloat16 or float16."""
    if name == "auto":
        return model_dtype
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be auto, {', '.join(COMPUTE_DTYPES)}; not {name!r}")
    return COMPUTE_DTYPES[name]


def check_quantizable(name: str, weight: torch.Tensor, kind: QuantKind) -> None:
    """Refuse a projection bitsandbytes cannot quantize as `kind`, naming it.

    bitsandbytes quantizes 16/32-bit float matrices. A 4-bit row must hold whole blocks:
    then every absmax block lies inside one row, which is what makes the fused q/k/v and
    gate/up layout quantize exactly as each projection alone (tests/worker/test_quant.py).
    bitsandbytes would quantize other widths with blocks straddling rows; the fused layout
    cannot reproduce that, so such a model is refused for 4-bit (int8 has one scale a row).
    """
    if weight.dim() != 2 or weight.dtype not in COMPUTE_DTYPES.values():
        raise NotQuantizableError(
            f"{name}: bitsandbytes quantizes 2-D float16/bfloat16/float32 weights, not "
            f"{weight.dtype} of shape {tuple(weight.shape)}"
        )
    in_features = weight.shape[1]
    if kind.blocksize is not None and in_features % kind.blocksize:
        raise NotQuantizableError(
            f"{name}: {kind.name} quantizes each row in blocks of {kind.blocksize} values, and "
            f"its rows have {in_features} (in_features of {tuple(weight.shape)}); serve this "
            f"model unquantized or with --quantize int8"
        )
