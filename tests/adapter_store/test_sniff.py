"""The sniffer never refuses a valid safetensors file as pickle, whatever its header length.

A safetensors file opens with its header length N as 8 little-endian bytes; N ≡ 128
(mod 256) makes the first byte 0x80, pickle's PROTO opcode. Before the parsers were one,
the worker refused every such file and the registry refused those whose second byte was
2-5. Here N = 66048 + k (bytes k, 0x02, 0x01, ...) for every residue k.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from adapter_store.basemodel import BaseModelSpec
from adapter_store.errors import GitLfsPointerError, PickleWeightsError
from adapter_store.validation import WEIGHTS_FILE, validate_adapter_dir
from tests.adapter_store.builders import write_lora
from tests.adapter_store.headers import BASE_LENGTH, with_header_length


@pytest.mark.parametrize("residue", range(256))
def test_every_header_length_residue_is_read_as_safetensors(
    residue: int, tmp_path: Path, tiny_base: BaseModelSpec
) -> None:
    directory = write_lora(tmp_path / "adapter", tiny_base)
    weights = directory / WEIGHTS_FILE
    with_header_length(weights, BASE_LENGTH + residue)
    assert weights.read_bytes()[0] == residue
    validated = validate_adapter_dir(directory, tiny_base, max_rank=16)
    assert len(validated.module_ranks) == 2 * tiny_base.num_layers


@pytest.mark.parametrize("residue", range(256))
def test_every_header_length_residue_of_a_blob_is_read(
    residue: int, tmp_path: Path, tiny_base: BaseModelSpec
) -> None:
    from adapter_store.validation import read_blob

    validated = validate_adapter_dir(write_lora(tmp_path / "a", tiny_base), tiny_base, 16)
    blob = tmp_path / "blob.safetensors"
    blob.write_bytes(validated.encode())
    with_header_length(blob, BASE_LENGTH + residue)
    assert read_blob(blob, tiny_base, max_rank=16).config == validated.config


@pytest.mark.parametrize("protocol", range(2, 6))
def test_pickle_and_lfs_pointers_are_still_named(protocol: int) -> None:
    from adapter_store.tensorfile import sniff

    data = pickle.dumps({"weights": [1.0, 2.0]}, protocol=protocol)
    with pytest.raises(PickleWeightsError, match="holds pickle bytes"):
        sniff(data[:64], len(data), "w.safetensors")
    with pytest.raises(PickleWeightsError):
        sniff(b"PK\x03\x04" + b"\0" * 60, 4096, "w.safetensors")
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n"
    with pytest.raises(GitLfsPointerError, match="git lfs pull"):
        sniff(pointer, len(pointer), "w.safetensors")
