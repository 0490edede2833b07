"""`lorapool serve`: Redis (if none is configured), the registry, a gateway and workers.

Everything runs on the embedded defaults: the packaged base model, a SQLite index and a
local blob directory under the data dir, and a private redis-server when no
`LORAPOOL_REDIS_URL` is given. Gateway and workers are subprocesses, stopped on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.settings import is_loopback, tokens

log = logging.getLogger("lorapool")
SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "adapters"
SAMPLE_NAMES = ("upper", "json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default=os.environ.get("LORAPOOL_LISTEN", "127.0.0.1:50051"))
    p.add_argument("--insecure", action="store_true", help="listen beyond loopback without tokens")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--data-dir", type=Path, help="LORAPOOL_DATA_DIR (SQLite index, blobs, redis)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(data_dir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            "lorapool: no LORAPOOL_REDIS_URL set and no redis-server on PATH; install Redis or set it"
        )
    port = free_port()
    (data_dir / "redis").mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir / "redis"),
        "--save",
        "60 1",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    return f"redis://127.0.0.1:{port}/0", proc


def prepare_registry(env: dict[str, str]) -> None:
    """Migrate the index and upload the sample adapters that are missing."""
    from adapter_store.basemodel import BaseModelSpec
    from adapter_store.blobs import open_blob_store
    from adapter_store.db import make_engine, make_session_factory, upgrade
    from adapter_store.errors import AdapterNotFound
    from adapter_store.repository import resolve
    from adapter_store.settings import StoreSettings
    from adapter_store.upload import upload_adapter

    store = StoreSettings.from_env(env)
    store.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(store.database_url)
    sessions = make_session_factory(make_engine(store.database_url))
    base = BaseModelSpec.from_hf_dir(store.base_model_dir)
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


def wait_serving(target: str, timeout_s: float, children: list[subprocess.Popen[bytes]]) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(c.poll() is not None for c in children):
            raise SystemExit("lorapool: a process exited during start-up; see its log above")
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"lorapool: the gateway on {target} did not become healthy")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = dict(os.environ)
    open_access = not tokens(env.get("LORAPOOL_API_TOKENS")) and not tokens(
        env.get("LORAPOOL_ADMIN_TOKENS")
    )
    if open_access and not args.insecure and not is_loopback(args.listen):
        sys.stderr.write(
            f"lorapool: refusing to listen on {args.listen} without LORAPOOL_API_TOKENS; pass --insecure to override\n"
        )
        return 2
    from worker.config import default_cache_dir
    from worker.model.source import DEFAULT_MODEL, resolve_model_dir

    data_dir = args.data_dir or Path(
        env.get("LORAPOOL_DATA_DIR") or default_cache_dir().parent / "lorapool-data"
    )
    env["LORAPOOL_DATA_DIR"] = str(data_dir)
    env.setdefault(
        "LORAPOOL_BASE_MODEL_DIR", str(resolve_model_dir(DEFAULT_MODEL, default_cache_dir()))
    )
    children: list[subprocess.Popen[bytes]] = []
    if not env.get("LORAPOOL_REDIS_URL"):
        env["LORAPOOL_REDIS_URL"], redis_proc = start_redis(data_dir)
        children.append(redis_proc)
    try:
        prepare_registry(env)
        gateway = [sys.executable, "-m", "gateway", "--listen", args.listen]
        children.append(
            subprocess.Popen(gateway + (["--insecure"] if args.insecure else []), env=env)
        )
        for _ in range(args.workers):
            children.append(subprocess.Popen([sys.executable, "-m", "worker"], env=env))
        wait_serving(args.listen, 600, children)
        sys.stdout.write(
            f"\nlorapool is serving on {args.listen} (Redis {env['LORAPOOL_REDIS_URL']}, data in {data_dir}).\n"
            f'Try:  lorapool generate --target {args.listen} --adapter upper "Name three colors."\n'
            "Stop with Ctrl-C.\n\n"
        )
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, _interrupt)
        while all(c.poll() is None for c in children):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for child in reversed(children):  # workers and gateway first, Redis last
            child.terminate()
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
