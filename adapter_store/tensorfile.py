"""Safetensors files read defensively (header first, bounded reads) and written canonically."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from adapter_store.errors import (
    CorruptSafetensorsError,
    GitLfsPointerError,
    PickleWeightsError,
)

# Every dtype the safetensors format defines, with its size in bytes.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
HEADER_ALIGNMENT = 8
SNIFF_BYTES = 64  # enough to tell safetensors, pickle, a torch zip and a git-LFS pointer apart
LFS_SIGNATURE = b"version https://git-lfs.github.com/spec/"
PK_ZIP = b"PK\x03\x04"  # torch.save's zip container


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: where a tensor's bytes lie, relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class TensorData:
    """A tensor as raw little-endian bytes with its safetensors dtype and shape."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def sniff(head: bytes, file_size: int, name: str) -> None:
    """Refuse pickle and git-LFS pointers by their first bytes, never a valid safetensors file.

    A safetensors file opens with its header length N (8 bytes, little-endian) followed
    by the header's JSON object, so byte 8 is `{` and N fits in the file: such a file
    passes whatever its first byte (N ≡ 128 mod 256 makes it 0x80, pickle's PROTO
    opcode). Otherwise we name what it looks like — a git-LFS pointer, pickle (0x80 then
    protocol 2-5) or torch.save's zip container — and leave any other damage to
    read_header, whose messages are more precise.
    """
    if len(head) >= 9:
        (length,) = struct.unpack("<Q", head[:8])
        if 2 <= length <= file_size - 8 and head[8:9] == b"{":
            return
    if head.startswith(LFS_SIGNATURE):
        raise GitLfsPointerError(f"{name} is a git-LFS pointer, not weights: run `git lfs pull`")
    if (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(PK_ZIP):
        raise PickleWeightsError(f"{name} holds pickle bytes, not safetensors; refused")


def sniff_file(path: Path) -> None:
    """sniff() on the first bytes of a file."""
    with path.open("rb") as file:
        head = file.read(SNIFF_BYTES)
    sniff(head, path.stat().st_size, path.name)


def read_header(file: BinaryIO, file_size: int) -> Header:
    """Parse and bounds-check the header; reads no tensor data.

    Never allocates more than the file's size: the header length is checked
    against the file before it is read.
    """
    prefix = file.read(8)
    if len(prefix) < 8:
        raise CorruptSafetensorsError(f"truncated safetensors: {file_size} bytes, no header")
    (length,) = struct.unpack("<Q", prefix)
    if length > file_size - 8 or length > MAX_HEADER_BYTES:
        raise CorruptSafetensorsError(
            f"bad safetensors header length {length} for a file of {file_size} bytes"
        )
    raw = file.read(length)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptSafetensorsError(f"invalid JSON in safetensors header: {exc}") from exc
    if not isinstance(parsed, dict):
        raise CorruptSafetensorsError("invalid safetensors header: not a JSON object")
    metadata = _metadata(parsed.pop("__metadata__", None))
    tensors = {name: _entry(name, value) for name, value in parsed.items()}
    _check_offsets(tensors, file_size - 8 - length)
    return Header(tensors=tensors, metadata=metadata, data_start=8 + length)


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise CorruptSafetensorsError("invalid safetensors header: __metadata__ not str → str")
    return value


def _entry(name: str, value: Any) -> TensorInfo:
    bad = CorruptSafetensorsError(f"invalid safetensors header entry for tensor {name!r}")
    if not isinstance(value, dict):
        raise bad
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in DTYPE_SIZES or not isinstance(shape, list) or not isinstance(offsets, list):
        raise bad
    if not all(type(d) is int and d >= 0 for d in shape):
        raise bad
    if len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
        raise bad
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise CorruptSafetensorsError(
            f"safetensors offsets of tensor {name!r} do not match its dtype and shape"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_offsets(tensors: Mapping[str, TensorInfo], data_size: int) -> None:
    previous: TensorInfo | None = None
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.end > data_size:
            raise CorruptSafetensorsError(
                f"safetensors offsets past the end of the file: tensor {info.name!r} ends at "
                f"{info.end}, data section holds {data_size} bytes (truncated?)"
            )
        if previous is not None and info.begin < previous.end:
            raise CorruptSafetensorsError(
                f"overlapping safetensors offsets: {previous.name!r} and {info.name!r}"
            )
        previous = info


def read_tensor(file: BinaryIO, header: Header, info: TensorInfo) -> TensorData:
    """Read one tensor's bytes (bounded by the checked header)."""
    file.seek(header.data_start + info.begin)
    data = file.read(info.end - info.begin)
    if len(data) != info.end - info.begin:
        raise CorruptSafetensorsError(f"truncated safetensors data for tensor {info.name!r}")
    return TensorData(dtype=info.dtype, shape=info.shape, data=data)


def open_header(path: Path) -> Header:
    """read_header on a file path."""
    with path.open("rb") as file:
        return read_header(file, path.stat().st_size)


def encode(tensors: Mapping[str, TensorData], metadata: Mapping[str, str]) -> bytes:
    """Serialize to safetensors bytes, canonically: equal inputs give equal bytes.

    Tensors are laid out by descending element size, then name (so every
    tensor stays aligned); the header is compact JSON with sorted keys,
    space-padded to a multiple of 8 bytes.
    """
    order = sorted(tensors, key=lambda n: (-DTYPE_SIZES[tensors[n].dtype], n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        tensor = tensors[name]
        header[name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(tensor.data)],
        }
        offset += len(tensor.data)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGNMENT)
    return b"".join([struct.pack("<Q", len(raw)), raw, *(tensors[n].data for n in order)])
