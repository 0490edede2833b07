"""StoreSettings from the environment and from flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter_store.settings import (
    SettingsError,
    StoreSettings,
    default_cache_dir,
    default_data_dir,
)


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


def test_one_default_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without LORAPOOL_DATA_DIR: the per-user data dir (XDG_DATA_HOME on Linux)."""
    env = {"XDG_DATA_HOME": str(tmp_path / "share")}
    monkeypatch.setenv("XDG_DATA_HOME", env["XDG_DATA_HOME"])
    assert default_data_dir(env) == tmp_path / "share" / "lorapool"
    assert StoreSettings.from_env(env).data_dir == default_data_dir(env)
    assert default_data_dir({"LORAPOOL_DATA_DIR": "/d"}) == Path("/d")


def test_default_cache_dir_is_shared_with_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.config import default_cache_dir as worker_cache_dir

    monkeypatch.setenv("LORAPOOL_CACHE_DIR", "/cache/here")
    assert default_cache_dir() == worker_cache_dir() == Path("/cache/here")
    assert default_cache_dir({}) != Path("/cache/here")


def test_missing_sqlite_file(tmp_path: Path) -> None:
    settings = StoreSettings.from_env({"LORAPOOL_DATA_DIR": str(tmp_path)})
    assert settings.missing_sqlite_file() == tmp_path / "registry.sqlite3"
    (tmp_path / "registry.sqlite3").touch()
    assert settings.missing_sqlite_file() is None
    pg = StoreSettings.from_env({"LORAPOOL_DATABASE_URL": "postgresql://h/db"})
    assert pg.missing_sqlite_file() is None
