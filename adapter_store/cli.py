"""`lorapool-admin`: upload, list, show, delete, gc and migrate the adapter registry."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from adapter_store import db, repository
from adapter_store.basemodel import BaseModelError, BaseModelSpec
from adapter_store.blobs import open_blob_store
from adapter_store.collector import DEFAULT_GRACE_S, collect_garbage
from adapter_store.errors import AdapterStoreError
from adapter_store.models import Adapter
from adapter_store.settings import SettingsError, StoreSettings
from adapter_store.upload import STAGES, upload_adapter

LIST_COLUMNS = ("name", "version", "status", "adapter_type", "rank", "dtype", "size_bytes")
LIST_HEADERS = {"adapter_type": "type", "size_bytes": "bytes"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorapool-admin", description=__doc__)
    parser.add_argument("--data-dir", type=Path, help="LORAPOOL_DATA_DIR")
    parser.add_argument("--database-url", help="LORAPOOL_DATABASE_URL")
    parser.add_argument("--blob-dir", type=Path, help="LORAPOOL_BLOB_DIR")
    parser.add_argument("--blob-url", help="LORAPOOL_BLOB_URL (s3://bucket/prefix)")
    parser.add_argument("--s3-endpoint-url", help="LORAPOOL_S3_ENDPOINT_URL")
    parser.add_argument("--max-rank", type=int, help="LORAPOOL_MAX_RANK")
    parser.add_argument("--base-model-dir", type=Path, help="LORAPOOL_BASE_MODEL_DIR")
    commands = parser.add_subparsers(dest="command", required=True)
    upload = commands.add_parser("upload", help="validate and store an adapter directory")
    upload.add_argument("directory", type=Path)
    upload.add_argument("--name", required=True)
    upload.add_argument("--description", default="")
    listing = commands.add_parser("list", help="list adapters")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--all", action="store_true", help="include deleted versions")
    show = commands.add_parser("show", help="show one adapter: NAME or NAME:VERSION")
    show.add_argument("ref")
    show.add_argument("--json", action="store_true")
    delete = commands.add_parser("delete", help="soft-delete NAME (latest) or NAME:VERSION")
    delete.add_argument("ref")
    gc = commands.add_parser("gc", help="remove blobs no live adapter references")
    gc.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, help="seconds (default 3600)")
    commands.add_parser("migrate", help="create or upgrade the index schema")
    return parser


def settings_from(args: argparse.Namespace) -> StoreSettings:
    return StoreSettings.from_env(
        data_dir=args.data_dir,
        database_url=args.database_url,
        blob_dir=args.blob_dir,
        blob_url=args.blob_url,
        s3_endpoint_url=args.s3_endpoint_url,
        max_rank=args.max_rank,
        base_model_dir=args.base_model_dir,
    )


def cmd_migrate(settings: StoreSettings, _f: sessionmaker[Session], _a: argparse.Namespace) -> None:
    db.upgrade(settings.database_url)
    sys.stdout.write(f"database at head: {settings.database_url}\n")


def cmd_upload(
    settings: StoreSettings, factory: sessionmaker[Session], args: argparse.Namespace
) -> None:
    base = BaseModelSpec.from_hf_dir(settings.base_model_dir)
    blobs = open_blob_store(settings)
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"upload {args.name}", total=len(STAGES))

        def report(stage: str) -> None:
            bar.update(task, completed=STAGES.index(stage), description=f"{args.name}: {stage}")

        adapter = upload_adapter(
            factory,
            blobs,
            args.directory,
            args.name,
            description=args.description,
            base=base,
            max_rank=settings.max_rank,
            progress=report,
        )
        bar.update(task, completed=len(STAGES))
    sys.stdout.write(f"{adapter.ref} {adapter.digest}\n")


def cmd_list(_s: StoreSettings, factory: sessionmaker[Session], args: argparse.Namespace) -> None:
    with factory() as session:
        adapters = repository.list_adapters(session, include_deleted=args.all)
    if args.json:
        sys.stdout.write(json.dumps([a.to_dict() for a in adapters], indent=2) + "\n")
        return
    longest = max((len(a.name) for a in adapters), default=4)
    table = Table()
    table.add_column("name", no_wrap=True, min_width=longest)
    for column in (*LIST_COLUMNS[1:], "digest"):
        table.add_column(LIST_HEADERS.get(column, column))
    for adapter in adapters:
        row = adapter.to_dict()
        table.add_row(*(str(row[c]) for c in LIST_COLUMNS), adapter.digest[:12])
    Console().print(table)


def cmd_show(_s: StoreSettings, factory: sessionmaker[Session], args: argparse.Namespace) -> None:
    with factory() as session:
        adapter = repository.resolve(session, args.ref)
    row = adapter.to_dict()
    if args.json:
        sys.stdout.write(json.dumps(row, indent=2) + "\n")
        return
    table = Table(show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in row.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    Console().print(table)


def cmd_delete(_s: StoreSettings, factory: sessionmaker[Session], args: argparse.Namespace) -> None:
    with factory() as session, session.begin():
        adapter: Adapter = repository.delete(session, args.ref)
    sys.stdout.write(f"deleted {adapter.ref}\n")


def cmd_gc(
    settings: StoreSettings, factory: sessionmaker[Session], args: argparse.Namespace
) -> None:
    report = collect_garbage(factory, open_blob_store(settings), grace_s=args.grace)
    sys.stdout.write(
        f"deleted {len(report.deleted)} blobs, kept {len(report.kept_young)} within the "
        f"{args.grace:g}s grace period\n"
    )


COMMANDS: dict[str, Callable[[StoreSettings, sessionmaker[Session], argparse.Namespace], None]] = {
    "migrate": cmd_migrate,
    "upload": cmd_upload,
    "list": cmd_list,
    "show": cmd_show,
    "delete": cmd_delete,
    "gc": cmd_gc,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
        engine = db.make_engine(settings.database_url)
    except (SettingsError, SQLAlchemyError, ValueError) as exc:
        return _fail(f"bad settings: {exc}")
    try:
        COMMANDS[args.command](settings, db.make_session_factory(engine), args)
    except (AdapterStoreError, BaseModelError, SettingsError) as exc:
        return _fail(str(exc))
    except SQLAlchemyError as exc:
        first = str(exc).splitlines()[0]
        return _fail(f"database error (has `lorapool-admin migrate` run?): {first}")
    except (BotoCoreError, ClientError) as exc:
        return _fail(f"blob store error: {exc}")
    except OSError as exc:
        return _fail(f"I/O error: {exc}")
    finally:
        engine.dispose()
    return 0


def _fail(message: str) -> int:
    sys.stderr.write(f"lorapool-admin: error: {' '.join(message.split())}\n")
    return 1
