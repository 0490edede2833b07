"""The one adapter parser: a PEFT directory or a registry blob in, a normalized LoRA adapter out.

Upload (the registry) and serving (the worker) both read adapters here, so an adapter
means the same thing at upload and at serve time. Order: file sniffing (pickle,
git-LFS, safetensors header start) → adapter_config.json (or the blob's normalized
config) → safetensors header (dtypes, names, shapes) → tensor data (finite values) →
VeRA conversion. Every problem the header already proves is refused before tensor
data is read. Nothing here unpickles anything, and nothing imports torch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from adapter_store import weightnames
from adapter_store.basemodel import PARENT, BaseModelSpec
from adapter_store.errors import (
    AdapterConfigError,
    MissingAdapterFile,
    NonFiniteWeightsError,
    PickleWeightsError,
    UnsupportedDtypeError,
    UnsupportedFeatureError,
)
from adapter_store.peftconfig import AdapterConfig, module_path, parse_adapter_config
from adapter_store.quantconfig import mismatch
from adapter_store.tensorfile import (
    Header,
    TensorData,
    encode,
    read_header,
    read_tensor,
    sniff_file,
)
from adapter_store.vera import vera_to_lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
CONFIG_METADATA_KEY = "lorapool.adapter_config"
DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
# Bits of the exponent field per dtype: all ones means inf or NaN.
EXPONENT_MASKS: dict[str, tuple[str, int]] = {
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F800000),
}
Pairs = dict[tuple[int, str], tuple[TensorData, TensorData]]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidatedAdapter:
    """An adapter that passed validation, in the blob layout the worker loads."""

    adapter_type: str  # "lora" or "vera" (the uploaded form; VeRA is stored as LoRA)
    config: dict[str, Any]  # normalized PEFT LoRA config (pattern keys in their given order)
    parsed: AdapterConfig  # the same config, parsed: ranks, alphas and scales per module
    modules: Pairs  # (layer, module) → (A [r, in], B [out, r]), PEFT's layouts
    tensors: dict[str, TensorData]  # PEFT LoRA tensor names → data
    module_ranks: dict[str, int]  # module path → rank
    dtype: str

    def encode(self) -> bytes:
        """The canonical blob bytes: identical adapters give identical bytes.

        The config keeps its key order: PEFT resolves rank_pattern and alpha_pattern by
        the first matching key, so sorting them would change which pattern applies.
        """
        config_json = json.dumps(self.config, separators=(",", ":"))
        return encode(self.tensors, {CONFIG_METADATA_KEY: config_json})


def validate_adapter_dir(directory: Path, base: BaseModelSpec, max_rank: int) -> ValidatedAdapter:
    """Validate a PEFT adapter directory against the base model; raise AdapterValidationError."""
    directory = Path(directory)
    weights = _weights_file(directory)
    config = parse_adapter_config(_read_config(directory), base, max_rank)
    _check_added_tokens(directory)
    return _read_weights(weights, config, base)


def read_blob(path: Path, base: BaseModelSpec, max_rank: int) -> ValidatedAdapter:
    """Read a registry blob (one safetensors file, normalized config in its metadata).

    The same checks as an upload, against the base model of whoever reads it: a blob
    validated for one deployment is refused by a worker serving a different base.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingAdapterFile(f"adapter blob {path} does not exist")
    sniff_file(path)
    with path.open("rb") as file:
        header = read_header(file, path.stat().st_size)
    text = header.metadata.get(CONFIG_METADATA_KEY)
    if text is None:
        raise AdapterConfigError(f"{path.name} carries no {CONFIG_METADATA_KEY} metadata")
    return _read_weights(path, parse_adapter_config(text, base, max_rank), base)


def read_adapter(source: Path, base: BaseModelSpec, max_rank: int) -> ValidatedAdapter:
    """A PEFT directory or a registry blob file, whichever `source` is, read to be served
    on `base`: warns (and serves) when the adapter records training on another quantization."""
    source = Path(source)
    read = read_blob if source.is_file() else validate_adapter_dir
    validated = read(source, base, max_rank)
    problem = mismatch(validated.parsed.base_quantization, base.quantization)
    if problem is not None:
        log.warning("adapter %s was %s: its outputs may drift", source.name, problem)
    return validated


def _read_weights(weights: Path, config: AdapterConfig, base: BaseModelSpec) -> ValidatedAdapter:
    with weights.open("rb") as file:
        header = read_header(file, weights.stat().st_size)
        _check_dtypes(header)
        layout = weightnames.check_layout(header, config, base)
        tensors = {name: _read(file, header, name) for name in header.tensors}
    for name, tensor in tensors.items():
        _check_finite(name, tensor)
    pairs = _lora_pairs(layout, tensors, base)
    return _normalized(config, pairs)


def _read(file: BinaryIO, header: Header, name: str) -> TensorData:
    return read_tensor(file, header, header.tensors[name])


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
    sniff_file(weights)
    return weights


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
) -> Pairs:
    """(layer, module) → (A [r, in], B [out, r]) for LoRA, converting VeRA exactly."""
    if layout.vera_shared is None:
        return {key: (tensors[a], tensors[b]) for key, (a, b) in layout.modules.items()}
    modules = {key: (tensors[b], tensors[d]) for key, (b, d) in layout.modules.items()}
    shared_a, shared_b = layout.vera_shared
    return vera_to_lora(tensors[shared_a], tensors[shared_b], modules, base)


def _normalized(config: AdapterConfig, pairs: Pairs) -> ValidatedAdapter:
    tensors: dict[str, TensorData] = {}
    ranks: dict[str, int] = {}
    for (layer, module), (lora_a, lora_b) in sorted(pairs.items()):
        prefix = f"base_model.model.model.layers.{layer}.{PARENT[module]}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = lora_a
        tensors[f"{prefix}.lora_B.weight"] = lora_b
        ranks[module_path(layer, module)] = lora_a.shape[0]
    is_vera = config.peft_type == "VERA"
    # VeRA is stored as exact LoRA whose scale is 1 everywhere: alpha = r, no patterns.
    parsed = (
        AdapterConfig(
            "LORA",
            config.r,
            float(config.r),
            False,
            config.target_modules,
            base_quantization=config.base_quantization,
        )
        if is_vera
        else config
    )
    normalized = {
        "peft_type": "LORA",
        "r": parsed.r,
        "lora_alpha": parsed.lora_alpha,
        "use_rslora": parsed.use_rslora,
        "rank_pattern": parsed.rank_pattern,
        "alpha_pattern": parsed.alpha_pattern,
        "target_modules": sorted({module for _, module in pairs}),
        "base_model_name_or_path": config.base_model_name_or_path,
    }
    if config.base_quantization is not None:  # only then: older blobs keep their bytes
        normalized["quantization_config"] = config.base_quantization.to_config()
    dtypes = sorted({DTYPE_NAMES[t.dtype] for t in tensors.values()})
    return ValidatedAdapter(
        adapter_type="vera" if is_vera else "lora",
        config=normalized,
        parsed=parsed,
        modules=dict(sorted(pairs.items())),
        tensors=tensors,
        module_ranks=ranks,
        dtype=",".join(dtypes),
    )
