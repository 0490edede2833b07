"""The base quantization in the registry: parsed from adapter_config.json, recorded on the
row (both databases), carried in the blob, kept out of older blobs' bytes; the base
fingerprint of a quantized base; migration 0002 over existing rows; the serving warning."""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from adapter_store import db
from adapter_store.basemodel import BaseModelError, BaseModelSpec
from adapter_store.blobs import LocalBlobStore
from adapter_store.errors import AdapterConfigError
from adapter_store.quantconfig import BaseQuantization, mismatch
from adapter_store.upload import upload_adapter
from adapter_store.validation import read_adapter, read_blob, validate_adapter_dir
from tests.adapter_store.builders import write_lora
from tests.adapter_store.conftest import TINY_CONFIG

NF4_BF16 = {
    "quant_method": "bitsandbytes",
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_use_double_quant": True,
}
SMOLLM2 = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
}


def seed() -> int:
    return random.SystemRandom().randrange(2**31)  # the session's database is shared


# -- the fingerprint -----------------------------------------------------------------


def test_full_precision_fingerprints_are_unchanged() -> None:
    """The values recorded before quantization existed (rows uploaded then stay valid)."""
    assert BaseModelSpec.from_config_dict(SMOLLM2).fingerprint == "c5683ea3489aa7ff"
    assert BaseModelSpec.from_config_dict(TINY_CONFIG).fingerprint == "f70fbbbbfcc76847"


def test_a_quantized_base_has_its_own_fingerprint() -> None:
    plain = BaseModelSpec.from_config_dict(SMOLLM2)
    nf4 = BaseModelSpec.from_config_dict({**SMOLLM2, "quantization_config": NF4_BF16})
    int8 = BaseModelSpec.from_config_dict(
        {**SMOLLM2, "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}
    )
    assert (plain.quantization, nf4.quantization, int8.quantization) == (None, "nf4", "int8")
    assert len({plain.fingerprint, nf4.fingerprint, int8.fingerprint}) == 3
    assert nf4.module_shapes() == plain.module_shapes()
    with pytest.raises(BaseModelError, match="bnb_4bit_quant_type 'nf2'"):
        BaseModelSpec.from_config_dict(
            {**SMOLLM2, "quantization_config": {**NF4_BF16, "bnb_4bit_quant_type": "nf2"}}
        )


# -- adapter_config.json -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (NF4_BF16, BaseQuantization("nf4", "bfloat16", True)),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, BaseQuantization("fp4", "float32")),
        ({"quant_method": "bitsandbytes", "_load_in_8bit": True}, BaseQuantization("int8")),
        ({"quant_method": "GPTQ", "bits": 4}, BaseQuantization("gptq")),
        ({"quant_method": "bitsandbytes"}, None),
    ],
)
def test_the_recorded_quantization_is_parsed(
    raw: dict[str, Any], expected: BaseQuantization | None, tmp_path: Path, tiny_base: BaseModelSpec
) -> None:
    directory = write_lora(tmp_path / "a", tiny_base, quantization_config=raw)
    validated = validate_adapter_dir(directory, tiny_base, 16)
    assert validated.parsed.base_quantization == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("nf4", "quantization_config must be an object"),
        ({**NF4_BF16, "bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type 'int4'"),
        ({**NF4_BF16, "bnb_4bit_compute_dtype": "float64"}, "bnb_4bit_compute_dtype 'float64'"),
        ({**NF4_BF16, "bnb_4bit_use_double_quant": "yes"}, "bnb_4bit_use_double_quant"),
        ({"quant_method": "a b"}, "quant_method 'a b'"),
    ],
)
def test_a_bad_recorded_quantization_is_refused(
    raw: Any, message: str, tmp_path: Path, tiny_base: BaseModelSpec
) -> None:
    directory = write_lora(tmp_path / "a", tiny_base, quantization_config=raw)
    with pytest.raises(AdapterConfigError, match=message):
        validate_adapter_dir(directory, tiny_base, 16)


def test_the_blob_carries_it_and_older_blobs_keep_their_bytes(
    tmp_path: Path, tiny_base: BaseModelSpec
) -> None:
    plain = validate_adapter_dir(write_lora(tmp_path / "p", tiny_base), tiny_base, 16)
    assert "quantization_config" not in plain.config  # no new key: the same bytes as before
    qlora = validate_adapter_dir(
        write_lora(tmp_path / "q", tiny_base, quantization_config=NF4_BF16), tiny_base, 16
    )
    assert qlora.config["quantization_config"] == NF4_BF16  # the canonical form
    blob = tmp_path / "blob.safetensors"
    blob.write_bytes(qlora.encode())
    assert read_blob(blob, tiny_base, 16).parsed.base_quantization == BaseQuantization(
        "nf4", "bfloat16", True
    )


# -- the row ----------------------------------------------------------------------------


def test_upload_records_the_base_quantization(
    committed_factory: sessionmaker[Session],
    blobs: LocalBlobStore,
    tiny_base: BaseModelSpec,
    tmp_path: Path,
    unique_name: str,
) -> None:
    qlora = write_lora(tmp_path / "q", tiny_base, seed=seed(), quantization_config=NF4_BF16)
    plain = write_lora(tmp_path / "p", tiny_base, seed=seed())
    first = upload_adapter(
        committed_factory, blobs, qlora, unique_name, base=tiny_base, max_rank=16
    )
    second = upload_adapter(
        committed_factory, blobs, plain, unique_name, base=tiny_base, max_rank=16
    )
    assert (first.base_quantization, second.base_quantization) == ("nf4", None)
    assert first.to_dict()["base_quantization"] == "nf4"
    assert first.base_fingerprint == tiny_base.fingerprint


def test_migration_0002_keeps_existing_rows(empty_database_url: str) -> None:
    db.upgrade(empty_database_url, "0001")
    engine = db.make_engine(empty_database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO adapter_names (name, created_at) VALUES ('old', '2026-01-01')")
            )
            connection.execute(text(OLD_ROW))
        db.upgrade(empty_database_url)
        with engine.connect() as connection:
            row = connection.execute(
                text("SELECT name, rank, base_quantization FROM adapters")
            ).one()
        assert tuple(row) == ("old", 4, None)
        db.downgrade(empty_database_url, "0001")
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM adapters")).scalar() == 1
    finally:
        engine.dispose()


OLD_ROW = """
INSERT INTO adapters (name, version, status, base_fingerprint, base_architecture, adapter_type,
    rank, max_module_rank, rank_pattern, alpha, alpha_pattern, use_rslora, target_modules,
    dtype, size_bytes, digest, description, created_at)
VALUES ('old', 1, 'READY', 'f70fbbbbfcc76847', 'llama', 'lora', 4, 4, '{}', 8.0, '{}', false,
    '["q_proj"]', 'float32', 10, 'ab', '', '2026-01-01')
"""


# -- serving ----------------------------------------------------------------------------


def test_read_adapter_warns_on_another_quantization(
    tmp_path: Path, tiny_base: BaseModelSpec, caplog: pytest.LogCaptureFixture
) -> None:
    directory = write_lora(tmp_path / "q", tiny_base, quantization_config=NF4_BF16)
    served = BaseModelSpec.from_config_dict(TINY_CONFIG)
    int8_base = dataclasses.replace(served, quantization="int8")
    nf4_base = dataclasses.replace(served, quantization="nf4")
    with caplog.at_level(logging.WARNING, logger="adapter_store.validation"):
        read_adapter(directory, nf4_base, 16)
        assert caplog.records == []
        read_adapter(directory, int8_base, 16)
        read_adapter(directory, served, 16)
    assert [r.getMessage().split(" was ")[1] for r in caplog.records] == [
        "trained on a nf4 base, served on a int8 base: its outputs may drift",
        "trained on a nf4 base, served on a full-precision base: its outputs may drift",
    ]
    assert mismatch(None, "nf4") is None  # nothing recorded: nothing to warn about
