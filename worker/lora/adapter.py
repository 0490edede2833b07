"""LoRA adapters as the engine holds them: per (layer, module) A [r, in] and s·Bᵀ [r, out].

Sources: a PEFT directory (adapter_config.json + adapter_model.safetensors) or a
registry blob (one safetensors file whose metadata carries the normalized config).
Both are parsed by adapter_store.validation — the one adapter parser, torch-free —
so an adapter means the same thing at upload and at serve time; this module only
turns the checked bytes into tensors and folds each module's scale into its B.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapter_store.basemodel import BaseModelSpec
from adapter_store.errors import AdapterStoreError
from adapter_store.peftconfig import module_path
from adapter_store.tensorfile import TensorData
from adapter_store.validation import ValidatedAdapter, read_adapter

# safetensors dtype → (numpy view of its bytes, torch dtype); bf16 is read as raw int16.
_DTYPES: dict[str, tuple[str, torch.dtype]] = {
    "F16": ("<f2", torch.float16),
    "BF16": ("<i2", torch.bfloat16),
    "F32": ("<f4", torch.float32),
}


class AdapterLoadError(ValueError):
    """The adapter cannot be served on this model; the message names the problem."""


@dataclass(frozen=True)
class HostLora:
    """One module's weights, ready to serve: y += (x Aᵀ) B with the scale folded into B."""

    a: torch.Tensor  # [r, in]  (PEFT's lora_A layout)
    b: torch.Tensor  # [r, out] scale · lora_Bᵀ


@dataclass(frozen=True)
class HostAdapter:
    """An adapter in host memory (the tier between the disk cache and device pages)."""

    adapter_id: str
    modules: dict[tuple[int, str], HostLora]  # (layer, module name) -> weights
    nbytes: int

    @property
    def rank(self) -> int:
        return max(m.a.shape[0] for m in self.modules.values())


def load_host_adapter(
    adapter_id: str, source: Path, base: BaseModelSpec, max_rank: int, dtype: torch.dtype, pin: bool
) -> HostAdapter:
    """Parse, check and convert one adapter for the host tier; pinned memory for CUDA copies."""
    modules = read_modules(source, base, max_rank, dtype)
    if pin:
        modules = {k: HostLora(m.a.pin_memory(), m.b.pin_memory()) for k, m in modules.items()}
    nbytes = sum(m.a.nbytes + m.b.nbytes for m in modules.values())
    return HostAdapter(adapter_id, modules, nbytes)


def read_modules(
    source: Path, base: BaseModelSpec, max_rank: int, dtype: torch.dtype
) -> dict[tuple[int, str], HostLora]:
    """Parse and check `source` against the base model; tensors in `dtype` on the CPU."""
    try:
        validated = read_adapter(Path(source), base, max_rank)
    except AdapterStoreError as exc:
        raise AdapterLoadError(str(exc)) from exc
    except OSError as exc:
        raise AdapterLoadError(f"adapter {source} could not be read: {exc}") from exc
    return to_host(validated, dtype)


def to_host(validated: ValidatedAdapter, dtype: torch.dtype) -> dict[tuple[int, str], HostLora]:
    """Tensors of every module, B transposed and pre-scaled (in float64, then cast once)."""
    out: dict[tuple[int, str], HostLora] = {}
    for (layer, module), (lora_a, lora_b) in validated.modules.items():
        scale = validated.parsed.scale_for(module_path(layer, module))
        b = _tensor(lora_b).double().t() * scale  # [r, out]
        out[(layer, module)] = HostLora(
            _tensor(lora_a).to(dtype).contiguous(), b.to(dtype).contiguous()
        )
    return out


def _tensor(data: TensorData) -> torch.Tensor:
    view, dtype = _DTYPES[data.dtype]
    array = np.frombuffer(data.data, dtype=view).reshape(data.shape)
    return torch.from_numpy(array.copy()).view(dtype)
