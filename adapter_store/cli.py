"""`lorapool-admin`: upload, list, show, delete, gc, migrate and merge the adapter registry.

Local mode (the default) opens the registry of the data directory every entry point shares
(`LORAPOOL_DATA_DIR`, else the per-user data dir). With `--target HOST:PORT` the same
upload/list/show/delete go through a gateway's admin API instead; that client lives in the
`lorapool` package (it needs the gRPC stubs) and is handed to `main` as `remote`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

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
REMOTE_COMMANDS = ("upload", "list", "show", "delete")
Remote = Callable[[argparse.Namespace], int]
Command = Callable[[StoreSettings, sessionmaker[Session], argparse.Namespace], None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorapool-admin", description=__doc__)
    parser.add_argument("--data-dir", type=Path, help="LORAPOOL_DATA_DIR")
    parser.add_argument("--database-url", help="LORAPOOL_DATABASE_URL")
    parser.add_argument("--blob-dir", type=Path, help="LORAPOOL_BLOB_DIR")
    parser.add_argument("--blob-url", help="LORAPOOL_BLOB_URL (s3://bucket/prefix)")
    parser.add_argument("--s3-endpoint-url", help="LORAPOOL_S3_ENDPOINT_URL")
    parser.add_argument("--max-rank", type=int, help="LORAPOOL_MAX_RANK")
    parser.add_argument("--base-model-dir", type=Path, help="LORAPOOL_BASE_MODEL_DIR")
    remote = parser.add_argument_group("through a gateway's admin API (upload, list, show, delete)")
    remote.add_argument("--target", help="HOST:PORT of a gateway; without it: the local registry")
    remote.add_argument("--token", help="admin token (default: $LORAPOOL_ADMIN_TOKEN)")
    remote.add_argument("--tls-ca", type=Path, help="CA certificate: connect with TLS")
    remote.add_argument("--timeout", type=float, default=60.0, help="seconds per call (60)")
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
    add_merge_arguments(commands)
    return parser


def add_merge_arguments(commands: Any) -> None:
    """`merge`: its flags here; its work in lorapool.merge (torch), handed to `main`."""
    merge = commands.add_parser(
        "merge", help="write NAME[:VERSION] merged into the base model as a HF model directory"
    )
    merge.add_argument("ref")
    merge.add_argument("--out", type=Path, required=True, help="a new (or empty) directory")
    merge.add_argument(
        "--qlora",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quantize the base as in training, dequantize to the compute dtype and merge "
        "there (default when the adapter records a 4-bit base); --no-qlora: a plain merge",
    )
    merge.add_argument("--quantization", help="with --qlora: nf4, fp4 or int8 (default: recorded)")
    merge.add_argument("--compute-dtype", help="with --qlora (default: recorded, else bfloat16)")


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


def print_adapters(rows: Sequence[Mapping[str, Any]], as_json: bool) -> None:
    """The listing, local or remote: a table, or JSON for scripts. Absent fields print as -."""
    if as_json:
        sys.stdout.write(json.dumps(list(rows), indent=2) + "\n")
        return
    longest = max((len(str(r["name"])) for r in rows), default=4)
    table = Table()
    table.add_column("name", no_wrap=True, min_width=longest)
    for column in (*LIST_COLUMNS[1:], "digest"):
        table.add_column(LIST_HEADERS.get(column, column))
    for row in rows:
        cells = (str(row.get(c, "-")) for c in LIST_COLUMNS)
        table.add_row(*cells, str(row.get("digest", ""))[:12])
    Console().print(table)


def print_adapter(row: Mapping[str, Any], as_json: bool) -> None:
    """One adapter, local or remote: a two-column table, or JSON."""
    if as_json:
        sys.stdout.write(json.dumps(dict(row), indent=2) + "\n")
        return
    table = Table(show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in row.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    Console().print(table)


def cmd_list(_s: StoreSettings, factory: sessionmaker[Session], args: argparse.Namespace) -> None:
    with factory() as session:
        adapters = repository.list_adapters(session, include_deleted=args.all)
    print_adapters([a.to_dict() for a in adapters], args.json)


def cmd_show(_s: StoreSettings, factory: sessionmaker[Session], args: argparse.Namespace) -> None:
    with factory() as session:
        adapter = repository.resolve(session, args.ref)
    print_adapter(adapter.to_dict(), args.json)


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


COMMANDS: dict[str, Command] = {
    "migrate": cmd_migrate,
    "upload": cmd_upload,
    "list": cmd_list,
    "show": cmd_show,
    "delete": cmd_delete,
    "gc": cmd_gc,
}


def main(
    argv: Sequence[str] | None = None, remote: Remote | None = None, merge: Command | None = None
) -> int:
    """Run one command; `remote` serves `--target` and `merge` merges (lorapool.admin passes
    both: they need gRPC and torch, which adapter_store does not import)."""
    args = build_parser().parse_args(argv)
    if args.command == "merge" and merge is None:
        return _fail("merge needs the lorapool package (torch): run `lorapool-admin merge`")
    if args.target:
        if args.command not in REMOTE_COMMANDS:
            return _fail(f"{args.command} works on a local registry only (drop --target)")
        if remote is None:
            return _fail("--target needs the lorapool package's client: run `lorapool-admin`")
        return remote(args)
    try:
        settings = settings_from(args)
        missing = settings.missing_sqlite_file()
        if missing is not None and args.command != "migrate":
            return _fail(
                f"no registry at {missing}: `lorapool serve` creates it on its first start, "
                "or run `lorapool-admin migrate` (same LORAPOOL_DATA_DIR / --data-dir)"
            )
        engine = db.make_engine(settings.database_url)
    except (SettingsError, SQLAlchemyError, ValueError) as exc:
        return _fail(f"bad settings: {exc}")
    try:
        command = merge if args.command == "merge" and merge is not None else COMMANDS[args.command]
        command(settings, db.make_session_factory(engine), args)
    except (AdapterStoreError, BaseModelError, SettingsError) as exc:
        return _fail(str(exc))
    except SQLAlchemyError as exc:
        first = str(exc).splitlines()[0]
        return _fail(
            f"database error at {settings.database_url} (has `lorapool-admin migrate` run "
            f"against it?): {first}"
        )
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
