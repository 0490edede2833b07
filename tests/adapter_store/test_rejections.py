"""Every refusal, each with a crafted adapter: the message names the problem, and no
READY row and no blob remain. Runs through the upload flow on both databases."""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from adapter_store import errors
from adapter_store.basemodel import BaseModelSpec
from adapter_store.blobs import LocalBlobStore
from adapter_store.models import Adapter
from adapter_store.upload import upload_adapter
from adapter_store.validation import validate_adapter_dir
from tests.adapter_store.builders import lora_config, lora_key, lora_tensors, write_adapter

Builder = Callable[[Path, BaseModelSpec], None]
SAFETENSORS = "adapter_model.safetensors"


class MarkerPayload:
    """Unpickling this creates (opens for writing) the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def pickle_bytes(directory: Path) -> bytes:
    return pickle.dumps(MarkerPayload(directory.parent / "UNPICKLED"), protocol=4)


def with_config(directory: Path, **extra: object) -> None:
    (directory / "adapter_config.json").write_text(json.dumps(lora_config(**extra)))  # type: ignore[arg-type]


def raw_safetensors(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def crafted_weights(content: bytes) -> Builder:
    def build(d: Path, base: BaseModelSpec) -> None:
        with_config(d)
        (d / SAFETENSORS).write_bytes(content)

    return build


def pickle_file(file_name: str) -> Builder:
    def build(d: Path, base: BaseModelSpec) -> None:
        with_config(d)
        (d / file_name).write_bytes(pickle_bytes(d))

    return build


def torch_zip(d: Path, base: BaseModelSpec) -> None:
    with_config(d)
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    (d / SAFETENSORS).write_bytes(buffer.getvalue())


def config_text(text: str) -> Builder:
    def build(d: Path, base: BaseModelSpec) -> None:
        write_adapter(d, text, lora_tensors(base))

    return build


def config_with(**fields: object) -> Builder:
    def build(d: Path, base: BaseModelSpec) -> None:
        config = {**lora_config(), **fields}
        write_adapter(d, {k: v for k, v in config.items() if v != "<drop>"}, lora_tensors(base))

    return build


def tensors_with(
    mutate: Callable[[dict[str, torch.Tensor], BaseModelSpec], None], **config: object
) -> Builder:
    def build(d: Path, base: BaseModelSpec) -> None:
        tensors = lora_tensors(base)
        mutate(tensors, base)
        write_adapter(d, lora_config(**config), tensors)  # type: ignore[arg-type]

    return build


def poison(
    value: float, dtype: torch.dtype
) -> Callable[[dict[str, torch.Tensor], BaseModelSpec], None]:
    def mutate(tensors: dict[str, torch.Tensor], base: BaseModelSpec) -> None:
        for name in tensors:
            tensors[name] = tensors[name].to(dtype)
        tensors[lora_key(1, "v_proj", "B")][3, 1] = value

    return mutate


def retype(dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor], BaseModelSpec], None]:
    def mutate(tensors: dict[str, torch.Tensor], base: BaseModelSpec) -> None:
        tensors[lora_key(0, "q_proj", "A")] = tensors[lora_key(0, "q_proj", "A")].to(dtype)

    return mutate


def add(
    name: str, shape: tuple[int, ...]
) -> Callable[[dict[str, torch.Tensor], BaseModelSpec], None]:
    def mutate(tensors: dict[str, torch.Tensor], base: BaseModelSpec) -> None:
        tensors[name] = torch.ones(shape)

    return mutate


def reshape_a(tensors: dict[str, torch.Tensor], base: BaseModelSpec) -> None:
    tensors[lora_key(0, "q_proj", "A")] = torch.ones(4, 32)


def drop_b(tensors: dict[str, torch.Tensor], base: BaseModelSpec) -> None:
    del tensors[lora_key(0, "q_proj", "B")]


def only_foreign(tensors: dict[str, torch.Tensor], base: BaseModelSpec) -> None:
    tensors.clear()
    tensors["transformer.h.0.attn.c_attn.lora_A.weight"] = torch.ones(4, 64)


def added_tokens_file(d: Path, base: BaseModelSpec) -> None:
    write_adapter(d, lora_config(), lora_tensors(base))
    (d / "added_tokens.json").write_text(json.dumps({"<tool>": 100}))


def no_weights(d: Path, base: BaseModelSpec) -> None:
    with_config(d)


def vera_without_projection(d: Path, base: BaseModelSpec) -> None:
    config = {"peft_type": "VERA", "r": 4, "target_modules": ["q_proj"], "save_projection": False}
    write_adapter(d, config, {"x": torch.ones(1)})


def empty_weights(d: Path, base: BaseModelSpec) -> None:
    with_config(d)
    (d / SAFETENSORS).write_bytes(raw_safetensors({"__metadata__": {}}))


LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"a" * 64 + b"\nsize 123\n"
TENSOR = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
TENSOR2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}

# id → (builder, exception class, substring of the message)
CASES: dict[str, tuple[Builder, type[errors.AdapterValidationError], str]] = {
    "pickle-bin": (
        pickle_file("adapter_model.bin"),
        errors.PickleWeightsError,
        "pickle weights refused",
    ),
    "pickle-pt": (pickle_file("adapter_model.pt"), errors.PickleWeightsError, "adapter_model.pt"),
    "pickle-as-safetensors": (
        lambda d, b: crafted_weights(pickle_bytes(d))(d, b),
        errors.PickleWeightsError,
        "holds pickle bytes",
    ),
    "torch-zip-as-safetensors": (torch_zip, errors.PickleWeightsError, "holds pickle bytes"),
    "git-lfs-pointer": (crafted_weights(LFS), errors.GitLfsPointerError, "git-LFS pointer"),
    "truncated-prefix": (crafted_weights(b"\x10\x00"), errors.CorruptSafetensorsError, "truncated"),
    "bad-header-length": (
        crafted_weights(raw_safetensors({}, length=2**40)),
        errors.CorruptSafetensorsError,
        "bad safetensors header length",
    ),
    "invalid-json-header": (
        crafted_weights(raw_safetensors(b'{"a": [1, 2')),
        errors.CorruptSafetensorsError,
        "invalid JSON",
    ),
    "header-not-object": (
        crafted_weights(raw_safetensors([1])),
        errors.CorruptSafetensorsError,
        "not a JSON object",
    ),
    "offsets-past-end": (
        crafted_weights(
            raw_safetensors(
                {"t": {"dtype": "F32", "shape": [10**8], "data_offsets": [0, 4 * 10**8]}}
            )
        ),
        errors.CorruptSafetensorsError,
        "offsets past the end",
    ),
    "truncated-data": (
        crafted_weights(raw_safetensors({"t": TENSOR}, b"\x00" * 10)),
        errors.CorruptSafetensorsError,
        "offsets past the end",
    ),
    "overlapping-offsets": (
        crafted_weights(raw_safetensors({"t": TENSOR, "u": TENSOR2}, b"\x00" * 24)),
        errors.CorruptSafetensorsError,
        "overlapping",
    ),
    "offsets-disagree-with-shape": (
        crafted_weights(raw_safetensors({"t": {**TENSOR, "data_offsets": [0, 12]}}, b"\x00" * 16)),
        errors.CorruptSafetensorsError,
        "do not match its dtype and shape",
    ),
    "config-not-json": (config_text("{not json"), errors.AdapterConfigError, "not valid JSON"),
    "config-not-object": (config_text("[1, 2]"), errors.AdapterConfigError, "not a JSON object"),
    "config-missing-r": (config_with(r="<drop>"), errors.AdapterConfigError, "r is missing"),
    "config-zero-r": (config_with(r=0), errors.AdapterConfigError, "r must be positive"),
    "config-negative-r": (config_with(r=-4), errors.AdapterConfigError, "r must be positive"),
    "config-string-r": (config_with(r="4"), errors.AdapterConfigError, "r must be an integer"),
    "config-bool-rslora": (config_with(use_rslora="yes"), errors.AdapterConfigError, "use_rslora"),
    "config-string-alpha": (config_with(lora_alpha="16"), errors.AdapterConfigError, "lora_alpha"),
    "config-bad-targets": (
        config_with(target_modules=7),
        errors.AdapterConfigError,
        "target_modules",
    ),
    "config-bad-rank-pattern": (
        config_with(rank_pattern=[1]),
        errors.AdapterConfigError,
        "rank_pattern",
    ),
    "missing-config": (
        lambda d, b: (d / SAFETENSORS).write_bytes(b"x" * 16),
        errors.MissingAdapterFile,
        "adapter_config.json",
    ),
    "missing-weights": (no_weights, errors.MissingAdapterFile, SAFETENSORS),
    "rank-above-max": (
        config_with(r=32),
        errors.RankTooLargeError,
        "r=32 exceeds the maximum rank 16",
    ),
    "rank-pattern-above-max": (
        config_with(rank_pattern={"q_proj": 64}),
        errors.RankTooLargeError,
        "rank_pattern['q_proj']=64 exceeds",
    ),
    "unknown-target-module": (
        config_with(target_modules=["q_proj", "c_attn"]),
        errors.UnknownTargetModuleError,
        "c_attn",
    ),
    "lm-head-target": (
        config_with(target_modules=["lm_head"]),
        errors.UnknownTargetModuleError,
        "lm_head",
    ),
    "weight-for-unknown-module": (
        tensors_with(
            add("base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight", (4, 64))
        ),
        errors.UnknownTargetModuleError,
        "qkv_proj",
    ),
    "wrong-shape": (tensors_with(reshape_a), errors.ShapeMismatchError, "has shape [4, 32]"),
    "missing-lora-b": (
        tensors_with(drop_b),
        errors.ShapeMismatchError,
        "lacks one of its two tensors",
    ),
    "weights-match-no-module": (
        tensors_with(only_foreign),
        errors.NoMatchingWeightsError,
        "matches no module",
    ),
    "layer-beyond-base": (
        tensors_with(add(lora_key(7, "q_proj", "A"), (4, 64))),
        errors.NoMatchingWeightsError,
        "matches no module",
    ),
    "weight-outside-targets": (
        tensors_with(add(lora_key(0, "k_proj", "A"), (4, 64))),
        errors.NoMatchingWeightsError,
        "not in target_modules",
    ),
    "no-tensors": (empty_weights, errors.NoMatchingWeightsError, "no tensors"),
    "nan-float32": (
        tensors_with(poison(float("nan"), torch.float32)),
        errors.NonFiniteWeightsError,
        "non-finite",
    ),
    "inf-float16": (
        tensors_with(poison(float("inf"), torch.float16)),
        errors.NonFiniteWeightsError,
        "non-finite",
    ),
    "neg-inf-bfloat16": (
        tensors_with(poison(float("-inf"), torch.bfloat16)),
        errors.NonFiniteWeightsError,
        "non-finite",
    ),
    "dtype-float64": (
        tensors_with(retype(torch.float64)),
        errors.UnsupportedDtypeError,
        "dtype F64",
    ),
    "dtype-int8": (tensors_with(retype(torch.int8)), errors.UnsupportedDtypeError, "dtype I8"),
    "dora-config": (config_with(use_dora=True), errors.UnsupportedFeatureError, "DoRA"),
    "dora-weights": (
        tensors_with(
            add("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", (64,))
        ),
        errors.UnsupportedFeatureError,
        "DoRA",
    ),
    "modules-to-save": (
        config_with(modules_to_save=["lm_head"]),
        errors.UnsupportedFeatureError,
        "modules_to_save",
    ),
    "added-tokens-config": (
        config_with(trainable_token_indices=[100, 101]),
        errors.UnsupportedFeatureError,
        "added tokens",
    ),
    "added-tokens-file": (added_tokens_file, errors.UnsupportedFeatureError, "added tokens"),
    "added-tokens-weights": (
        tensors_with(
            add("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta", (2, 64))
        ),
        errors.UnsupportedFeatureError,
        "added tokens",
    ),
    "other-peft-type": (
        config_with(peft_type="IA3"),
        errors.UnsupportedFeatureError,
        "adapter type 'IA3'",
    ),
    "vera-without-projection": (
        vera_without_projection,
        errors.UnsupportedFeatureError,
        "save_projection",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejected_with_its_message_and_nothing_kept(
    case: str,
    tmp_path: Path,
    tiny_base: BaseModelSpec,
    session_factory: sessionmaker[Session],
    blobs: LocalBlobStore,
) -> None:
    build, error, message = CASES[case]
    directory = tmp_path / "adapter"
    directory.mkdir()
    build(directory, tiny_base)
    with pytest.raises(error, match=None) as raised:
        upload_adapter(session_factory, blobs, directory, "rejected", base=tiny_base, max_rank=16)
    assert message in str(raised.value)
    with session_factory() as session:
        assert session.scalars(select(Adapter).where(Adapter.name == "rejected")).all() == []
    assert list(blobs.list_digests()) == []
    assert not (tmp_path / "UNPICKLED").exists()


@pytest.mark.parametrize("case", ["bad-header-length", "offsets-past-end"])
def test_corrupt_headers_allocate_little(
    case: str, tmp_path: Path, tiny_base: BaseModelSpec
) -> None:
    CASES[case][0](tmp_path, tiny_base)
    tracemalloc.start()
    with pytest.raises(errors.CorruptSafetensorsError):
        validate_adapter_dir(tmp_path, tiny_base, 16)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 256 * 1024


def test_pickle_payload_is_live(tmp_path: Path) -> None:
    """The payload the pickle tests use really would create the marker if unpickled."""
    directory = tmp_path / "adapter"
    directory.mkdir()
    payload = directory / "payload"
    payload.write_bytes(pickle_bytes(directory))
    script = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())"
    subprocess.run([sys.executable, "-c", script, str(payload)], check=True)
    assert (tmp_path / "UNPICKLED").exists()
