"""The upload flow under concurrency and crashes, and gc's grace period (both databases)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from adapter_store import repository, upload
from adapter_store.basemodel import BaseModelSpec
from adapter_store.blobs import LocalBlobStore
from adapter_store.collector import collect_garbage
from adapter_store.models import Adapter, AdapterStatus
from adapter_store.upload import upload_adapter
from tests.adapter_store.builders import write_lora
from tests.adapter_store.conftest import TINY_CONFIG

UPLOADERS = 20


class SimulatedCrash(BaseException):
    """Stands in for the process dying: not an Exception, nothing handles it."""


def make_old(blobs: LocalBlobStore, digest: str, seconds: float = 7200) -> None:
    then = time.time() - seconds
    os.utime(blobs.path_for(digest), (then, then))


def fresh_seed() -> int:
    """Seeds unique across tests: the session's database is shared, and equal
    tensors mean equal digests, which another test's rows would keep alive."""
    return random.SystemRandom().randrange(2**31)


def rows(factory: sessionmaker[Session], name: str) -> list[Adapter]:
    with factory() as session:
        return list(session.scalars(select(Adapter).where(Adapter.name == name)))


def test_concurrent_uploads_of_one_name_get_versions_1_to_20(
    committed_factory: sessionmaker[Session],
    blobs: LocalBlobStore,
    tiny_base: BaseModelSpec,
    tmp_path: Path,
    unique_name: str,
) -> None:
    dirs = [write_lora(tmp_path / str(i), tiny_base, seed=fresh_seed()) for i in range(UPLOADERS)]
    start = threading.Barrier(UPLOADERS)

    def run(directory: Path) -> int:
        start.wait()
        adapter = upload_adapter(
            committed_factory, blobs, directory, unique_name, base=tiny_base, max_rank=16
        )
        return adapter.version

    with ThreadPoolExecutor(UPLOADERS) as pool:
        versions = list(pool.map(run, dirs))
    assert sorted(versions) == list(range(1, UPLOADERS + 1))
    stored = rows(committed_factory, unique_name)
    assert sorted(a.version for a in stored) == list(range(1, UPLOADERS + 1))
    assert len({a.digest for a in stored}) == UPLOADERS
    assert all(blobs.exists(a.digest) for a in stored)


def test_crash_between_blob_and_commit_leaves_no_ready_row(
    committed_factory: sessionmaker[Session],
    blobs: LocalBlobStore,
    tiny_base: BaseModelSpec,
    tmp_path: Path,
    unique_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_register = upload.register

    def register_then_die(*args: object, **kwargs: object) -> Adapter:
        real_register(*args, **kwargs)  # type: ignore[arg-type]  # row flushed, not committed
        raise SimulatedCrash

    monkeypatch.setattr(upload, "register", register_then_die)
    with pytest.raises(SimulatedCrash):
        upload_adapter(
            committed_factory,
            blobs,
            write_lora(tmp_path / "a", tiny_base, seed=fresh_seed()),
            unique_name,
            base=tiny_base,
            max_rank=16,
        )
    assert rows(committed_factory, unique_name) == []
    (orphan,) = blobs.list_digests()
    assert collect_garbage(committed_factory, blobs, grace_s=3600).deleted == []
    make_old(blobs, orphan)
    assert collect_garbage(committed_factory, blobs, grace_s=3600).deleted == [orphan]
    assert list(blobs.list_digests()) == []


def test_gc_respects_references_soft_deletes_and_grace(
    committed_factory: sessionmaker[Session],
    blobs: LocalBlobStore,
    tiny_base: BaseModelSpec,
    tmp_path: Path,
    unique_name: str,
) -> None:
    def add(seed: int) -> Adapter:
        directory = write_lora(tmp_path / str(seed), tiny_base, seed=fresh_seed())
        return upload_adapter(
            committed_factory, blobs, directory, unique_name, base=tiny_base, max_rank=16
        )

    live, dead = add(1), add(2)
    with committed_factory() as session, session.begin():
        assert repository.delete(session, f"{unique_name}:2").status == AdapterStatus.DELETED
    old_orphan, young_orphan = blobs.put(b"old orphan"), blobs.put(b"young orphan")
    for digest in (live.digest, dead.digest, old_orphan):
        make_old(blobs, digest)
    report = collect_garbage(committed_factory, blobs, grace_s=3600)
    assert sorted(report.deleted) == sorted([dead.digest, old_orphan])
    assert report.kept_young == [young_orphan]
    assert sorted(blobs.list_digests()) == sorted([live.digest, young_orphan])
    assert blobs.get(live.digest)


def test_gc_during_a_slow_upload_keeps_its_blob(
    committed_factory: sessionmaker[Session],
    blobs: LocalBlobStore,
    tiny_base: BaseModelSpec,
    tmp_path: Path,
    unique_name: str,
) -> None:
    # An identical orphan blob, long past the grace period, is already there:
    # the upload's put must refresh it so the concurrent gc keeps it.
    directory = write_lora(tmp_path / "a", tiny_base, seed=fresh_seed())
    first = upload_adapter(
        committed_factory, blobs, directory, f"{unique_name}-x", base=tiny_base, max_rank=16
    )
    with committed_factory() as session, session.begin():
        repository.delete(session, f"{unique_name}-x")
    make_old(blobs, first.digest)
    collected: list[list[str]] = []

    def slow_progress(stage: str) -> None:
        if stage == "commit":  # the blob is written, its row not yet committed
            collected.append(collect_garbage(committed_factory, blobs, grace_s=60).deleted)

    adapter = upload_adapter(
        committed_factory,
        blobs,
        directory,
        unique_name,
        base=tiny_base,
        max_rank=16,
        progress=slow_progress,
    )
    assert adapter.digest == first.digest
    assert collected == [[]]
    assert blobs.get(adapter.digest)
    with committed_factory() as session:
        assert repository.resolve(session, unique_name).digest == adapter.digest


CRASHING_UPLOAD = """
import json, os, sys
from pathlib import Path
from adapter_store import db, upload
from adapter_store.basemodel import BaseModelSpec
from adapter_store.blobs import LocalBlobStore

url, blob_dir, adapter_dir, name, base = sys.argv[1:6]
register = upload.register

def register_then_die(*args, **kwargs):
    register(*args, **kwargs)  # the row is flushed inside the open transaction
    os._exit(17)  # the process dies before the commit

upload.register = register_then_die
factory = db.make_session_factory(db.make_engine(url))
spec = BaseModelSpec.from_config_dict(json.loads(base))
upload.upload_adapter(factory, LocalBlobStore(Path(blob_dir)), Path(adapter_dir), name, base=spec, max_rank=16)
"""


def test_killed_process_between_blob_and_commit_leaves_no_ready_row(
    database_url: str,
    committed_factory: sessionmaker[Session],
    blobs: LocalBlobStore,
    tmp_path: Path,
    unique_name: str,
    tiny_base: BaseModelSpec,
) -> None:
    directory = write_lora(tmp_path / "a", tiny_base, seed=fresh_seed())
    argv = [database_url, str(blobs.root), str(directory), unique_name, json.dumps(TINY_CONFIG)]
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_UPLOAD, *argv], capture_output=True, text=True, check=False
    )
    assert done.returncode == 17, done.stderr
    assert rows(committed_factory, unique_name) == []
    (orphan,) = blobs.list_digests()
    make_old(blobs, orphan)
    assert collect_garbage(committed_factory, blobs, grace_s=3600).deleted == [orphan]
    # The name is usable afterwards: the next upload gets version 1.
    adapter = upload_adapter(
        committed_factory, blobs, directory, unique_name, base=tiny_base, max_rank=16
    )
    assert (adapter.version, adapter.status) == (1, AdapterStatus.READY)
