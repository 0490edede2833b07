"""Upload validation: an adapter directory in, a normalized LoRA adapter out (or a named refusal).

Order: file sniffing (pickle, git-LFS) → adapter_config.json → safetensors
header (dtypes, names, shapes) → tensor data (finite values) → VeRA conversion.
Every problem the header already proves is refused before tensor data is read.
Nothing here unpickles anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapter_store import weightnames
from adapter_store.basemodel import PARENT, BaseModelSpec
from adapter_store.errors import (
    AdapterConfigError,
    GitLfsPointerError,
    MissingAdapterFile,
    NonFiniteWeightsError,
    PickleWeightsError,
    UnsupportedDtypeError,
    UnsupportedFeatureError,
)
from adapter_store.peftconfig import AdapterConfig, module_path, parse_adapter_config
from adapter_store.tensorfile import Header, TensorData, encode, read_header, read_tensor
from adapter_store.vera import vera_to_lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
CONFIG_METADATA_KEY = "lorapool.adapter_config"
LFS_SIGNATURE = b"version https://git-lfs.github.com/spec/"
DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
# Bits of the exponent field per dtype: all ones means inf or NaN.
EXPONENT_MASKS: dict[str, tuple[str, int]] = {
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F800000),
}


@dataclass(frozen=True)
class ValidatedAdapter:
    """An adapter that passed validation, in the blob layout the worker loads."""

    adapter_type: str  # "lora" or "vera" (the uploaded form; VeRA is stored as LoRA)
    config: dict[str, Any]  # normalized PEFT LoRA config
    tensors: dict[str, TensorData]  # PEFT LoRA tensor names → data
    module_ranks: dict[str, int]  # module path → rank
    dtype: str

    def encode(self) -> bytes:
        """The canonical blob bytes: identical adapters give identical bytes."""
        config_json = json.dumps(self.config, sort_keys=True, separators=(",", ":"))
        return encode(self.tensors, {CONFIG_METADATA_KEY: config_json})


def validate_adapter_dir(directory: Path, base: BaseModelSpec, max_rank: int) -> ValidatedAdapter:
    """Validate a PEFT adapter directory against the base model; raise AdapterValidationError."""
    directory = Path(directory)
    weights = _weights_file(directory)
    config = parse_adapter_config(_read_config(directory), base, max_rank)
    _check_added_tokens(directory)
    with weights.open("rb") as file:
        header = read_header(file, weights.stat().st_size)
        _check_dtypes(header)
        layout = weightnames.check_layout(header, config, base)
        tensors = {name: read_tensor(file, header, info) for name, info in header.tensors.items()}
    for name, tensor in tensors.items():
        _check_finite(name, tensor)
    pairs = _lora_pairs(layout, tensors, base)
    return _normalized(config, pairs)


def _weights_file(directory: Path) -> Path:
    if not directory.is_dir():
        raise MissingAdapterFile(f"adapter directory {directory} does not exist")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickled = sorted(
            p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
        )
        if pickled:
            raise PickleWeightsError(
                f"pickle weights refused ({', '.join(pickled)}): upload {WEIGHTS_FILE} instead"
            )
        raise MissingAdapterFile(f"{directory} has no {WEIGHTS_FILE}")
    with weights.open("rb") as file:
        head = file.read(64)
    if head.startswith(LFS_SIGNATURE):
        raise GitLfsPointerError(
            f"{WEIGHTS_FILE} is a git-LFS pointer, not weights: run `git lfs pull` first"
        )
    if _looks_pickled(head):
        raise PickleWeightsError(f"{WEIGHTS_FILE} holds pickle bytes, not safetensors; refused")
    return weights


def _looks_pickled(head: bytes) -> bool:
    # Pickle protocol 2+ opens with PROTO (0x80) and the protocol number;
    # torch.save's zip container opens with a zip local-file header.
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(
        b"PK\x03\x04"
    )


def _read_config(directory: Path) -> str:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise MissingAdapterFile(f"{directory} has no {CONFIG_FILE}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterConfigError(f"{CONFIG_FILE} is not UTF-8 text") from exc


def _check_added_tokens(directory: Path) -> None:
    path = directory / "added_tokens.json"
    if not path.is_file():
        return
    try:
        added = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterConfigError("added_tokens.json is not valid JSON") from exc
    if added:
        raise UnsupportedFeatureError("added tokens (added_tokens.json)", f"{len(added)} tokens")


def _check_dtypes(header: Header) -> None:
    for name, info in sorted(header.tensors.items()):
        if info.dtype not in DTYPE_NAMES:
            raise UnsupportedDtypeError(
                f"tensor {name!r} has dtype {info.dtype}; only float16, bfloat16, float32 are served"
            )


def _check_finite(name: str, tensor: TensorData) -> None:
    view, mask = EXPONENT_MASKS[tensor.dtype]
    bits = np.frombuffer(tensor.data, dtype=view)
    if np.any((bits & mask) == mask):
        raise NonFiniteWeightsError(f"tensor {name!r} holds non-finite values (NaN or inf)")


def _lora_pairs(
    layout: weightnames.Layout, tensors: dict[str, TensorData], base: BaseModelSpec
) -> dict[tuple[int, str], tuple[TensorData, TensorData]]:
    """(layer, module) → (A [r, in], B [out, r]) for LoRA, converting VeRA exactly."""
    if layout.vera_shared is None:
        return {key: (tensors[a], tensors[b]) for key, (a, b) in layout.modules.items()}
    modules = {key: (tensors[b], tensors[d]) for key, (b, d) in layout.modules.items()}
    shared_a, shared_b = layout.vera_shared
    return vera_to_lora(tensors[shared_a], tensors[shared_b], modules, base)


def _normalized(
    config: AdapterConfig, pairs: dict[tuple[int, str], tuple[TensorData, TensorData]]
) -> ValidatedAdapter:
    tensors: dict[str, TensorData] = {}
    ranks: dict[str, int] = {}
    for (layer, module), (lora_a, lora_b) in sorted(pairs.items()):
        prefix = f"base_model.model.model.layers.{layer}.{PARENT[module]}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = lora_a
        tensors[f"{prefix}.lora_B.weight"] = lora_b
        ranks[module_path(layer, module)] = lora_a.shape[0]
    is_vera = config.peft_type == "VERA"
    normalized = {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "target_modules": sorted({module for _, module in pairs}),
        "base_model_name_or_path": config.base_model_name_or_path,
    }
    dtypes = sorted({DTYPE_NAMES[t.dtype] for t in tensors.values()})
    return ValidatedAdapter(
        adapter_type="vera" if is_vera else "lora",
        config=normalized,
        tensors=tensors,
        module_ranks=ranks,
        dtype=",".join(dtypes),
    )
