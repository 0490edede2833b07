"""`lorapool serve`: Redis (if none is configured), the registry, a gateway and workers.

Everything runs on the embedded defaults: the packaged base model, a SQLite index and a
local blob directory under the data dir (adapter_store.settings.default_data_dir, the same
one `lorapool-admin` uses), and a private redis-server when no `LORAPOOL_REDIS_URL` is
given. The children are supervised (lorapool.supervisor): one that dies is restarted, and
only Ctrl-C or SIGTERM stops the stack, workers first, then the gateway, then Redis.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapter_store.settings import default_cache_dir, default_data_dir
from gateway.settings import exposure_refusal, tokens
from lorapool.banner import banner, local_target
from lorapool.supervisor import ChildSpec, Supervisor, describe_exit

log = logging.getLogger("lorapool")
GENERATION_SERVICE = "lorapool.v1.Generation"
START_TIMEOUT_S = 600.0  # a first start dequantizes the base model; a busy CPU loads slowly


class StartupFailed(Exception):
    """A child died, or the gateway never became healthy, before the stack served."""


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def quantization(text: str) -> str:
    """`none` or a name in the worker's table (nf4, fp4, int8): refused here, not in a worker."""
    from worker.model.quant import UnsupportedQuantizationError, quant_kind

    if text != "none":
        try:
            quant_kind(text)
        except UnsupportedQuantizationError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default=os.environ.get("LORAPOOL_LISTEN", "127.0.0.1:50051"))
    p.add_argument("--insecure", action="store_true", help="listen beyond loopback without tokens")
    p.add_argument("--workers", type=positive, default=1, help="worker processes (1)")
    p.add_argument("--data-dir", type=Path, help="LORAPOOL_DATA_DIR (SQLite index, blobs, redis)")
    p.add_argument(
        "--gateway-metrics-port", type=int, help="LORAPOOL_GATEWAY_METRICS_PORT (default: free)"
    )
    p.add_argument(
        "--worker-metrics-port",
        type=int,
        help="LORAPOOL_WORKER_METRICS_PORT: worker i gets this + i (default: free ports)",
    )
    p.add_argument(
        "--quantize",
        type=quantization,
        help="LORAPOOL_QUANTIZE: the workers' base projections as nf4, fp4 or int8 (bitsandbytes)",
    )
    p.add_argument(
        "--compute-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="LORAPOOL_COMPUTE_DTYPE: the quantized matmuls' dtype (auto: the model's)",
    )


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held at once while picking)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class Plan:
    """What `serve` runs, decided once from flags and the environment."""

    listen: str
    insecure: bool
    data_dir: Path
    env: dict[str, str]  # the children's environment
    redis_port: int | None  # a private redis-server on this port; None: LORAPOOL_REDIS_URL
    gateway_metrics_port: int
    worker_metrics_ports: list[int]


def plan_of(args: argparse.Namespace, environ: dict[str, str]) -> Plan:
    env = dict(environ)
    data_dir = args.data_dir or default_data_dir(env)
    env["LORAPOOL_DATA_DIR"] = str(data_dir)
    env.setdefault("LORAPOOL_METRICS_ADDR", "127.0.0.1")  # metrics stay on loopback
    if "LORAPOOL_BASE_MODEL_DIR" not in env:
        from worker.model.source import DEFAULT_MODEL, resolve_model_dir

        env["LORAPOOL_BASE_MODEL_DIR"] = str(
            resolve_model_dir(DEFAULT_MODEL, default_cache_dir(env))
        )
    if args.quantize:
        env["LORAPOOL_QUANTIZE"] = args.quantize
    if args.compute_dtype:
        env["LORAPOOL_COMPUTE_DTYPE"] = args.compute_dtype
    picked = iter(free_ports(args.workers + 2))
    redis_port = None if env.get("LORAPOOL_REDIS_URL") else next(picked)
    if redis_port is not None:
        env["LORAPOOL_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    gateway_port = args.gateway_metrics_port or env.get("LORAPOOL_GATEWAY_METRICS_PORT")
    worker_base = args.worker_metrics_port or env.get("LORAPOOL_WORKER_METRICS_PORT")
    return Plan(
        listen=args.listen,
        insecure=args.insecure or env.get("LORAPOOL_INSECURE") == "1",
        data_dir=data_dir,
        env=env,
        redis_port=redis_port,
        gateway_metrics_port=int(gateway_port) if gateway_port else next(picked),
        worker_metrics_ports=[
            int(worker_base) + i if worker_base else next(picked) for i in range(args.workers)
        ],
    )


def child_specs(plan: Plan) -> list[ChildSpec]:
    """The table of children, in start order (stop order is the reverse)."""
    specs = []
    if plan.redis_port is not None:
        specs.append(redis_spec(plan.data_dir / "redis", plan.redis_port))
    gateway = [sys.executable, "-m", "gateway", "--listen", plan.listen]
    gateway += ["--metrics-port", str(plan.gateway_metrics_port)]
    grace_s = float(plan.env.get("LORAPOOL_GRACE_S") or 10)
    specs.append(
        ChildSpec("gateway", gateway + ["--insecure"] * plan.insecure, plan.env, grace_s + 10)
    )
    drain_s = float(plan.env.get("LORAPOOL_DRAIN_S") or 30)
    for i, port in enumerate(plan.worker_metrics_ports, start=1):
        worker = [sys.executable, "-m", "worker", "--metrics-port", str(port)]
        specs.append(ChildSpec(f"worker-{i}", worker, plan.env, drain_s + 15))
    return specs


def redis_spec(directory: Path, port: int) -> ChildSpec:
    """A private redis-server that persists to `directory` (append-only file), so a restart
    on the same port brings back the queues the gateway and workers reconnect to."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StartupFailed("no LORAPOOL_REDIS_URL set and no redis-server on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    argv += ["--appendonly", "yes", "--save", "60 1", "--logfile", "redis.log"]
    return ChildSpec("redis", argv, None, 30.0)


def wait_for(
    ready: Callable[[], bool], what: str, supervisor: Supervisor, stop: threading.Event
) -> bool:
    """Poll `ready` until it holds (True) or Ctrl-C (False); a child's death fails the start."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not stop.is_set():
        for child, returncode in supervisor.dead():
            raise StartupFailed(
                f"{child.spec.name} (pid {child.pid}) {describe_exit(returncode)} during "
                "start-up; see its log above"
            )
        if ready():
            return True
        if time.monotonic() > deadline:
            raise StartupFailed(f"{what} not ready after {START_TIMEOUT_S:.0f} s")
        stop.wait(0.5)
    return False


def redis_up(url: str) -> Callable[[], bool]:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)

    def ready() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    return ready


def generation_serving(target: str) -> Callable[[], bool]:
    """The gateway reports lorapool.v1.Generation SERVING (Redis up and a worker live)."""
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    request = health_pb2.HealthCheckRequest(service=GENERATION_SERVICE)

    def ready() -> bool:
        try:
            return stub.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    return ready


def refusal(args: argparse.Namespace, env: dict[str, str]) -> str | None:
    """Why serve must not start: the gateway's own rule (beyond loopback, API tokens)."""
    insecure = args.insecure or env.get("LORAPOOL_INSECURE") == "1"
    return exposure_refusal(args.listen, tokens(env.get("LORAPOOL_API_TOKENS")), insecure)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s lorapool %(levelname)s %(message)s"
    )
    log.setLevel(logging.INFO)
    environ = dict(os.environ)
    problem = refusal(args, environ)
    if problem is not None:
        sys.stderr.write(f"lorapool: {problem}\n")
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        plan = plan_of(args, environ)
        supervisor = Supervisor(child_specs(plan))
    except StartupFailed as exc:
        sys.stderr.write(f"lorapool: {exc}\n")
        return 1
    try:
        return serve(plan, supervisor, stop)
    except StartupFailed as exc:
        log.error("%s", exc)
        return 1
    finally:
        supervisor.stop()


def serve(plan: Plan, supervisor: Supervisor, stop: threading.Event) -> int:
    """Start the children in order, say so once a worker serves, then supervise until stop."""
    from lorapool.samples import prepare_registry

    if plan.redis_port is not None:
        supervisor.start("redis")
        if not wait_for(redis_up(plan.env["LORAPOOL_REDIS_URL"]), "redis", supervisor, stop):
            return 0
    prepare_registry(plan.env)
    for name in supervisor.children:
        if name != "redis":
            supervisor.start(name)
    target = local_target(plan.listen)
    if not wait_for(generation_serving(target), "the gateway", supervisor, stop):
        return 0
    sys.stdout.write(banner(plan.listen, plan.data_dir, plan.env, metrics(plan), os.environ))
    sys.stdout.flush()
    while not stop.wait(0.5):
        supervisor.check()
    log.info("stopping (workers, then the gateway, then Redis)")
    return 0


def metrics(plan: Plan) -> dict[str, int]:
    ports = {"gateway": plan.gateway_metrics_port}
    ports.update({f"worker-{i}": p for i, p in enumerate(plan.worker_metrics_ports, start=1)})
    return ports
