"""`lorapool-admin`: the registry CLI, locally or through a gateway's admin API (`--target`).

Local mode is adapter_store.cli, plus `merge` (lorapool.merge: needs torch, local only). With `--target HOST:PORT`, upload / list / show / delete
call the gateway instead (Admin.Upload, Admin.Get, Admin.Delete, Generation.ListAdapters)
with the admin token from `--token` or `LORAPOOL_ADMIN_TOKEN`, and print the same tables
and `--json` as local mode. Errors are one line naming the gRPC status; the exit code is 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import Progress

from adapter_store import cli as local
from protos.lorapool.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc

CHUNK_BYTES = 1 << 20
CONFIG_FILE = "adapter_config.json"
# What a user can do about each status (the gateway's message follows).
HINTS: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAUTHENTICATED: "pass an admin token with --token or LORAPOOL_ADMIN_TOKEN",
    grpc.StatusCode.PERMISSION_DENIED: "the token is not one of the gateway's admin tokens",
    grpc.StatusCode.UNAVAILABLE: "is the gateway up at that address?",
    grpc.StatusCode.DEADLINE_EXCEEDED: "no answer in time (--timeout)",
    grpc.StatusCode.UNIMPLEMENTED: "the target has no lorapool admin service",
}


@dataclass(frozen=True)
class Remote:
    """The two stubs and the per-call options of one `--target`."""

    admin: admin_pb2_grpc.AdminStub
    generation: generation_pb2_grpc.GenerationStub
    metadata: tuple[tuple[str, str], ...]
    timeout_s: float

    @classmethod
    def connect(cls, args: argparse.Namespace) -> Remote:
        if args.tls_ca:
            credentials = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
            channel = grpc.secure_channel(args.target, credentials)
        else:
            channel = grpc.insecure_channel(args.target)
        token = args.token or os.environ.get("LORAPOOL_ADMIN_TOKEN")
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return cls(
            admin_pb2_grpc.AdminStub(channel),
            generation_pb2_grpc.GenerationStub(channel),
            metadata,
            args.timeout,
        )


def row_of(info: generation_pb2.AdapterInfo) -> dict[str, Any]:
    """An AdapterInfo as the dict local mode prints (every field the message has)."""
    row: dict[str, Any] = {}
    for field in info.DESCRIPTOR.fields:
        value = getattr(info, field.name)
        scalar = isinstance(value, str | bytes | int | float | bool)
        row[field.name] = value if scalar else list(value)  # a repeated field
    return row


def archive(directory: Path, into: Path) -> Path:
    """A gzip tar of the adapter directory's regular files, as the gateway's Upload expects."""
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds no {CONFIG_FILE}")
    path = into / "adapter.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for file in sorted(p for p in directory.rglob("*") if p.is_file()):
            tar.add(file, arcname=str(Path("adapter") / file.relative_to(directory)))
    return path


def chunks(
    header: admin_pb2.UploadHeader, path: Path, sent: Callable[[int], None]
) -> Iterator[admin_pb2.UploadChunk]:
    yield admin_pb2.UploadChunk(header=header)
    with path.open("rb") as f:
        while data := f.read(CHUNK_BYTES):
            yield admin_pb2.UploadChunk(data=data)
            sent(len(data))


def cmd_upload(remote: Remote, args: argparse.Namespace) -> None:
    header = admin_pb2.UploadHeader(name=args.name, description=args.description)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="lorapool-admin-") as tmp:
        path = archive(args.directory, Path(tmp))
        with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task(f"upload {args.name}", total=path.stat().st_size)
            info = remote.admin.Upload(
                chunks(header, path, lambda n: bar.advance(task, n)),
                metadata=remote.metadata,
                timeout=remote.timeout_s,
            )
    sys.stdout.write(f"{info.name}:{info.version} {info.digest}\n")


def cmd_list(remote: Remote, args: argparse.Namespace) -> None:
    if args.all:
        raise ValueError("--all (deleted versions) works on a local registry only")
    reply = remote.generation.ListAdapters(
        generation_pb2.ListAdaptersRequest(), metadata=remote.metadata, timeout=remote.timeout_s
    )
    local.print_adapters([row_of(a) for a in reply.adapters], args.json)


def cmd_show(remote: Remote, args: argparse.Namespace) -> None:
    info = remote.admin.Get(
        admin_pb2.AdapterRef(ref=args.ref), metadata=remote.metadata, timeout=remote.timeout_s
    )
    local.print_adapter(row_of(info), args.json)


def cmd_delete(remote: Remote, args: argparse.Namespace) -> None:
    reply = remote.admin.Delete(
        admin_pb2.AdapterRef(ref=args.ref), metadata=remote.metadata, timeout=remote.timeout_s
    )
    sys.stdout.write(f"deleted {reply.adapter.name}:{reply.adapter.version}\n")


COMMANDS: dict[str, Callable[[Remote, argparse.Namespace], None]] = {
    "upload": cmd_upload,
    "list": cmd_list,
    "show": cmd_show,
    "delete": cmd_delete,
}


def run_remote(args: argparse.Namespace) -> int:
    """One command against `args.target`; gRPC statuses become one-line errors."""
    try:
        COMMANDS[args.command](Remote.connect(args), args)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        details = exc.details() or ""  # type: ignore[attr-defined]
        hint = HINTS.get(code)
        text = f"{details} ({hint})" if hint else details
        return _fail(f"{args.target}: {code.name}: {text}")
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    return 0


def _fail(message: str) -> int:
    sys.stderr.write(f"lorapool-admin: error: {' '.join(message.split())}\n")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    return local.main(argv, remote=run_remote, merge=run_merge)


def run_merge(settings: Any, factory: Any, args: argparse.Namespace) -> None:
    """`merge` (local only): torch and the worker's layers load only for this command."""
    from lorapool.merge import cmd_merge

    cmd_merge(settings, factory, args)


if __name__ == "__main__":
    raise SystemExit(main())
