"""Alembic environment for the adapter registry (PostgreSQL and SQLite)."""

from __future__ import annotations

import os

from alembic import context

from adapter_store.db import make_engine
from adapter_store.models import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or context.get_x_argument(
        as_dictionary=True
    ).get("url")
    url = url or os.environ.get("LORAPOOL_DATABASE_URL")
    if not url:
        raise RuntimeError("no database URL: pass -x url=... or set LORAPOOL_DATABASE_URL")
    return url


def run_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(database_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
