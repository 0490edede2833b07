"""Fixtures: a PostgreSQL server (the local one, or one started here), per-backend test
databases, rolled-back sessions, blob stores and a tiny base model."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from adapter_store import db
from adapter_store.basemodel import BaseModelSpec
from adapter_store.blobs import LocalBlobStore

LOCAL_PG = ("127.0.0.1", 5432)
BACKENDS = ["sqlite", "postgresql"]
TINY_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 100,
}


def _answers(host: str, port: int) -> bool:
    try:
        with psycopg.connect(
            host=host, port=port, user="postgres", dbname="postgres", connect_timeout=3
        ):
            return True
    except psycopg.OperationalError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}")) or [shutil.which(tool) or ""]
    if not found[-1]:
        pytest.fail(f"no PostgreSQL at {LOCAL_PG} and no {tool} to start one")
    return found[-1]


def _as_postgres_user(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root; drop to the postgres user when we are root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[tuple[str, int]]:
    """(host, port) of a PostgreSQL server with trust auth for user postgres.

    The local server when one answers; otherwise one started here (initdb +
    pg_ctl in a temporary directory, as the postgres user when we are root).
    """
    if _answers(*LOCAL_PG):
        yield LOCAL_PG
        return
    # Not under pytest's tmp dir: that is private to root, and postgres must reach it.
    root = Path(tempfile.mkdtemp(prefix="lorapool-test-pg-"))
    data, port = root / "data", _free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    _run([_pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"])
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    ctl = [_pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options, "-w"]
    _run([*ctl, "start"])
    try:
        yield ("127.0.0.1", port)
    finally:
        _run([*ctl, "-m", "fast", "stop"])
        shutil.rmtree(root, ignore_errors=True)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(_as_postgres_user(cmd), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed: {done.stderr.strip() or done.stdout.strip()}")


def _admin(server: tuple[str, int], sql: str) -> None:
    host, port = server
    with psycopg.connect(
        host=host, port=port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def make_pg_database(postgres_server: tuple[str, int]) -> Iterator[object]:
    """A factory of fresh, empty databases on the server, all dropped at the end."""
    created: list[str] = []

    def make() -> str:
        name = f"lorapool_test_{uuid.uuid4().hex[:12]}"
        _admin(postgres_server, f'CREATE DATABASE "{name}"')
        created.append(name)
        host, port = postgres_server
        return f"postgresql+psycopg://postgres@{host}:{port}/{name}"

    yield make
    for name in created:
        _admin(postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _empty_url(backend: str, request: pytest.FixtureRequest, tmp: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp / f'{uuid.uuid4().hex[:8]}.sqlite3'}"
    make = request.getfixturevalue("make_pg_database")
    return str(make())  # type: ignore[operator]


@pytest.fixture(scope="session", params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated database per backend, shared by the session (tests use unique names)."""
    url = _empty_url(request.param, request, tmp_path_factory.mktemp("sqlite"))
    db.upgrade(url)
    return url


@pytest.fixture(params=BACKENDS)
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database with no tables, per test."""
    return _empty_url(request.param, request, tmp_path)


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = db.make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> Iterator[sessionmaker[Session]]:
    """Sessions inside one outer transaction that is rolled back after the test."""
    with engine.connect() as connection:
        outer = connection.begin()
        yield sessionmaker(
            bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
        )
        outer.rollback()


@pytest.fixture
def committed_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that really commit (concurrency, gc, crash tests); use unique names."""
    return db.make_session_factory(engine)


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture(scope="session")
def tiny_base() -> BaseModelSpec:
    return BaseModelSpec.from_config_dict(TINY_CONFIG)


@pytest.fixture
def unique_name() -> str:
    return f"adapter-{uuid.uuid4().hex[:10]}"
