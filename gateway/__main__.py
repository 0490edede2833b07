"""`python -m gateway`: run the gRPC gateway with settings from flags and `LORAPOOL_*`."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from adapter_store.blobs import open_blob_store
from adapter_store.db import make_engine, make_session_factory
from adapter_store.settings import StoreSettings
from gateway.server import serve
from gateway.settings import from_args
from gateway.store import StoreRegistry


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("LORAPOOL_LOG_LEVEL", "INFO"),
        format="%(asctime)s gateway %(levelname)s %(message)s",
    )
    try:
        settings = from_args(argv, os.environ)
    except ValueError as exc:
        sys.stderr.write(f"lorapool-gateway: {exc}\n")
        return 2
    store = StoreSettings.from_env()
    base_dir = store.base_model_dir if (store.base_model_dir / "config.json").is_file() else None
    registry = StoreRegistry(
        make_session_factory(make_engine(store.database_url)),
        open_blob_store(store),
        base_dir,
        store.max_rank,
        max_threads=settings.registry_threads,
        max_pending=settings.registry_max_pending,
    )
    asyncio.run(serve(settings, registry))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
