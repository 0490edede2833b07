"""VeRA → LoRA conversion, exact: the same ΔW in PEFT's LoRA layout with scale 1.

PEFT's VeRA layer computes, for a module with in_features n and out_features m,
    y += λ_b ⊙ ( B[:m, :] @ ( λ_d ⊙ ( A[:, :n] @ x ) ) )
with the shared projections A: [r, n_max], B: [m_max, r] sliced per module and
the per-module vectors λ_d: [r], λ_b: [m]. So ΔW = diag(λ_b) · B[:m] · diag(λ_d) · A[:, :n]
and the LoRA pair
    A' = diag(λ_d) · A[:, :n]    [r, n]
    B' = diag(λ_b) · B[:m]       [m, r]
reproduces it exactly with LoRA scale lora_alpha / r = 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from adapter_store.basemodel import BaseModelSpec
from adapter_store.tensorfile import TensorData

if TYPE_CHECKING:
    import torch

# A VeRA module, (layer, short module name), mapped to its λ_b and λ_d tensors.
VeraModules = Mapping[tuple[int, str], tuple[TensorData, TensorData]]


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[name]


def _to_torch(tensor: TensorData) -> torch.Tensor:
    import torch

    flat = torch.frombuffer(bytearray(tensor.data), dtype=_torch_dtype(tensor.dtype))
    return flat.reshape(tensor.shape).to(torch.float32)


def _to_data(tensor: torch.Tensor, dtype: str) -> TensorData:
    import torch

    cast = tensor.to(_torch_dtype(dtype)).contiguous()
    raw = cast.view(torch.uint8).numpy().tobytes()
    return TensorData(dtype=dtype, shape=tuple(cast.shape), data=raw)


def vera_to_lora(
    vera_a: TensorData, vera_b: TensorData, modules: VeraModules, base: BaseModelSpec
) -> dict[tuple[int, str], tuple[TensorData, TensorData]]:
    """Each module's LoRA (A', B') in the dtype of its λ vectors; math in float32."""
    shared_a = _to_torch(vera_a)  # [r, n_max]
    shared_b = _to_torch(vera_b)  # [m_max, r]
    converted = {}
    for (layer, module), (lambda_b, lambda_d) in modules.items():
        in_features, out_features = base.module_shape(module)
        b = _to_torch(lambda_b)  # [m]
        d = _to_torch(lambda_d)  # [r]
        lora_a = d[:, None] * shared_a[:, :in_features]  # [r, n]
        lora_b = b[:, None] * shared_b[:out_features, :]  # [m, r]
        converted[(layer, module)] = (
            _to_data(lora_a, lambda_d.dtype),
            _to_data(lora_b, lambda_b.dtype),
        )
    return converted
