"""The registry `lorapool serve` starts from: migrated, with the sample adapters uploaded."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from adapter_store.basemodel import BaseModelSpec
from adapter_store.blobs import open_blob_store
from adapter_store.db import make_engine, make_session_factory, upgrade
from adapter_store.errors import AdapterNotFound
from adapter_store.repository import resolve
from adapter_store.settings import StoreSettings
from adapter_store.upload import upload_adapter

log = logging.getLogger("lorapool")
SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "adapters"
SAMPLE_NAMES = ("upper", "json")


def prepare_registry(env: Mapping[str, str]) -> None:
    """Migrate the index of `env`'s data dir and upload the sample adapters it lacks."""
    store = StoreSettings.from_env(env)
    store.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(store.database_url)
    engine = make_engine(store.database_url)
    sessions = make_session_factory(engine)
    base = BaseModelSpec.from_hf_dir(store.base_model_dir)
    try:
        for name in SAMPLE_NAMES:
            if not (SAMPLES / name).is_dir():
                log.warning("sample adapter %s not found under %s", name, SAMPLES)
                continue
            with sessions() as session:
                try:
                    resolve(session, name)
                    continue
                except AdapterNotFound:
                    pass
            upload_adapter(
                sessions,
                open_blob_store(store),
                SAMPLES / name,
                name,
                description="sample",
                base=base,
                max_rank=store.max_rank,
            )
            log.info("registered sample adapter %s", name)
    finally:
        engine.dispose()
