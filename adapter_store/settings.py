"""The adapter store's settings: one frozen object, built at the entry point."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_MAX_RANK = 128
BASE_MODEL_SUBDIR = Path("models") / "smollm2-135m-instruct"


class SettingsError(ValueError):
    """A setting has a value the store cannot use."""


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The data directory of every entry point (serve, gateway, worker, admin, run).

    `LORAPOOL_DATA_DIR`, else the per-user data directory (`~/.local/share/lorapool` on
    Linux): the SQLite index, the local blobs and `lorapool serve`'s private Redis live here.
    This is the only place the default is decided; entry points call it, nothing below them.
    """
    env = os.environ if environ is None else environ
    return Path(env.get("LORAPOOL_DATA_DIR") or _user_dir("data", ".local/share"))


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`LORAPOOL_CACHE_DIR`, else the per-user cache directory (`~/.cache/lorapool` on Linux):
    the base model's safetensors cache and the workers' adapter blob cache."""
    env = os.environ if environ is None else environ
    return Path(env.get("LORAPOOL_CACHE_DIR") or _user_dir("cache", ".cache"))


@dataclass(frozen=True)
class StoreSettings:
    """Where the index and the blobs live, and what the deployment serves.

    `blob_url` (s3://bucket/prefix) selects the S3-compatible backend; without
    it blobs go to the local directory `blob_dir`. S3 credentials left as None
    fall back to boto3's default credential chain.
    """

    data_dir: Path
    database_url: str
    blob_dir: Path
    base_model_dir: Path
    blob_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_region: str | None = None
    max_rank: int = DEFAULT_MAX_RANK

    def __post_init__(self) -> None:
        if self.max_rank <= 0:
            raise SettingsError(f"max_rank must be positive, got {self.max_rank}")
        if self.blob_url is not None and not self.blob_url.startswith("s3://"):
            raise SettingsError(f"blob URL must start with s3://, got {self.blob_url!r}")

    def missing_sqlite_file(self) -> Path | None:
        """The SQLite file `database_url` names when it does not exist yet, else None.

        Callers that only read check it first, so a mistyped data dir gives a clear error
        instead of creating an empty registry there.
        """
        scheme, sep, rest = self.database_url.partition(":///")
        if not sep or scheme.split("+")[0] != "sqlite":
            return None
        database = rest.split("?", 1)[0]  # sqlite:///relative or sqlite:////absolute
        if database in ("", ":memory:"):
            return None
        path = Path(database)
        return None if path.exists() else path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> StoreSettings:
        """Build settings from `LORAPOOL_*` variables; keyword overrides (flags) win.

        Overrides whose value is None are ignored, so argparse defaults pass through.
        """
        env = os.environ if environ is None else environ
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise SettingsError(f"unknown settings: {sorted(unknown)}")
        data_dir = Path(given.get("data_dir") or default_data_dir(env))
        cache_dir = default_cache_dir(env)
        rank_text = env.get("LORAPOOL_MAX_RANK", str(DEFAULT_MAX_RANK))
        try:
            max_rank = int(rank_text)
        except ValueError as exc:
            raise SettingsError(f"LORAPOOL_MAX_RANK must be an integer, got {rank_text!r}") from exc
        settings = cls(
            data_dir=data_dir,
            database_url=env.get("LORAPOOL_DATABASE_URL")
            or f"sqlite:///{data_dir / 'registry.sqlite3'}",
            blob_dir=Path(env.get("LORAPOOL_BLOB_DIR") or data_dir / "blobs"),
            base_model_dir=Path(
                env.get("LORAPOOL_BASE_MODEL_DIR") or cache_dir / BASE_MODEL_SUBDIR
            ),
            blob_url=env.get("LORAPOOL_BLOB_URL") or None,
            s3_endpoint_url=env.get("LORAPOOL_S3_ENDPOINT_URL") or None,
            s3_access_key_id=env.get("LORAPOOL_S3_ACCESS_KEY_ID") or None,
            s3_secret_access_key=env.get("LORAPOOL_S3_SECRET_ACCESS_KEY") or None,
            s3_region=env.get("LORAPOOL_S3_REGION") or None,
            max_rank=max_rank,
        )
        if "data_dir" in given:
            given.pop("data_dir")
            # Paths derived from an overridden data dir follow it unless set explicitly.
            if not env.get("LORAPOOL_DATABASE_URL"):
                given.setdefault("database_url", f"sqlite:///{data_dir / 'registry.sqlite3'}")
            if not env.get("LORAPOOL_BLOB_DIR"):
                given.setdefault("blob_dir", data_dir / "blobs")
        converted: dict[str, Any] = {
            k: Path(v) if k.endswith("_dir") else v for k, v in given.items()
        }
        return replace(settings, **converted)


def _user_dir(kind: str, xdg_default: str) -> Path:
    """platformdirs' per-user directory; without platformdirs (a bare GPU host), XDG's."""
    try:
        import platformdirs
    except ImportError:
        xdg = os.environ.get(f"XDG_{kind.upper()}_HOME")
        return Path(xdg or Path.home() / xdg_default) / "lorapool"
    return Path(getattr(platformdirs, f"user_{kind}_dir")("lorapool"))
