"""StoreSettings from the environment and from flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter_store.settings import SettingsError, StoreSettings


def test_defaults_derive_from_the_data_dir(tmp_path: Path) -> None:
    settings = StoreSettings.from_env(
        {"LORAPOOL_DATA_DIR": str(tmp_path), "LORAPOOL_CACHE_DIR": "/c"}
    )
    assert settings.data_dir == tmp_path
    assert settings.database_url == f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    assert settings.blob_dir == tmp_path / "blobs"
    assert settings.blob_url is None
    assert settings.max_rank == 128
    assert settings.base_model_dir == Path("/c/models/smollm2-135m-instruct")


def test_environment_names(tmp_path: Path) -> None:
    env = {
        "LORAPOOL_DATA_DIR": str(tmp_path),
        "LORAPOOL_DATABASE_URL": "postgresql://postgres@127.0.0.1/x",
        "LORAPOOL_BLOB_DIR": "/blobs",
        "LORAPOOL_BLOB_URL": "s3://bucket/prefix",
        "LORAPOOL_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        "LORAPOOL_MAX_RANK": "64",
        "LORAPOOL_BASE_MODEL_DIR": "/model",
    }
    settings = StoreSettings.from_env(env)
    assert settings.database_url == "postgresql://postgres@127.0.0.1/x"
    assert (settings.blob_dir, settings.blob_url) == (Path("/blobs"), "s3://bucket/prefix")
    assert (settings.s3_endpoint_url, settings.max_rank) == ("http://127.0.0.1:9000", 64)
    assert settings.base_model_dir == Path("/model")


def test_flags_override_and_follow_the_data_dir(tmp_path: Path) -> None:
    settings = StoreSettings.from_env(
        {"LORAPOOL_MAX_RANK": "64"}, data_dir=tmp_path, max_rank=32, database_url=None
    )
    assert settings.max_rank == 32
    assert settings.blob_dir == tmp_path / "blobs"
    assert settings.database_url.endswith(str(tmp_path / "registry.sqlite3"))


@pytest.mark.parametrize(
    "env",
    [{"LORAPOOL_MAX_RANK": "0"}, {"LORAPOOL_MAX_RANK": "x"}, {"LORAPOOL_BLOB_URL": "http://x"}],
)
def test_bad_values(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        StoreSettings.from_env(env)
