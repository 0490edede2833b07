"""Alembic: upgrade head on an empty database, and a downgrade/upgrade round trip."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from adapter_store import db
from adapter_store.models import Base

TABLES = {"adapters", "adapter_names"}


def tables(url: str) -> set[str]:
    engine = db.make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def schema_diff(url: str) -> list[object]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_head_on_empty_database(empty_database_url: str) -> None:
    assert tables(empty_database_url) == set()
    db.upgrade(empty_database_url)
    assert tables(empty_database_url) == TABLES
    assert schema_diff(empty_database_url) == []


def test_downgrade_upgrade_round_trip(empty_database_url: str) -> None:
    db.upgrade(empty_database_url)
    db.downgrade(empty_database_url, "base")
    assert tables(empty_database_url) == set()
    db.upgrade(empty_database_url)
    assert tables(empty_database_url) == TABLES
    assert schema_diff(empty_database_url) == []
