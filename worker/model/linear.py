"""The base model's linear layers: y = x Wᵀ (+ b), x [T, in] → y [T, out], however W is stored.

Kinds (one class each; the quantized ones live in `worker.model.quant_bnb`):
  DenseLinear   W [out, in] in the model dtype: F.linear
  Linear4bit    W as bitsandbytes NF4/FP4 codes with one absmax per block of a row
  Linear8bit    W as LLM.int8() rows: int8 codes and one scale per row
Projections that share an input run fused (q/k/v, gate/up): `fuse` concatenates the
layers along `out`, each kind by its own `concat`, so the fused layer computes exactly
what the projections would alone. LoRA deltas are added afterwards by ops.lora.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Self

import torch
import torch.nn.functional as F


class Linear(Protocol):
    """One (possibly fused) base projection."""

    @property
    def in_features(self) -> int: ...

    @property
    def out_features(self) -> int: ...

    @property
    def bias(self) -> torch.Tensor | None: ...  # [out]

    @property
    def nbytes(self) -> int: ...  # bytes of every tensor it holds (device memory)

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...  # [T, in] -> [T, out], x's dtype

    @classmethod
    def concat(cls, parts: Sequence[Self]) -> Self: ...  # stacked along out


@dataclass(frozen=True)
class DenseLinear:
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None = None  # [out]

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def concat(cls, parts: Sequence[DenseLinear]) -> DenseLinear:
        return cls(torch.cat([p.weight for p in parts]), cat_bias(parts))


def cat_bias(parts: Sequence[Linear]) -> torch.Tensor | None:
    """The parts' biases end to end ([Σ out]); zeros for a part without one; None if none has."""
    some = next((p.bias for p in parts if p.bias is not None), None)
    if some is None:
        return None
    return torch.cat(
        [p.bias if p.bias is not None else some.new_zeros(p.out_features) for p in parts]
    )


def fuse(parts: Sequence[Linear]) -> Linear:
    """One layer computing cat([p(x) for p in parts], -1); the parts share their kind."""
    kinds = {type(p) for p in parts}
    if len(kinds) != 1:
        names = sorted(k.__name__ for k in kinds)
        raise ValueError(f"cannot fuse projections stored differently: {names}")
    if len(parts) == 1:
        return parts[0]
    return type(parts[0]).concat(parts)
