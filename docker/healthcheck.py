#!/opt/venv/bin/python
"""`lorapool-healthcheck [gateway|worker]`: the images' HEALTHCHECK. Exit 0 healthy, 1 not.

Without an argument the role is read from the container's command line (PID 1, or the
child of `docker-init` when the service runs with `init: true`); one-shot commands such
as `lorapool-admin` count as healthy.

- gateway: the standard grpc.health.v1 service answers SERVING for lorapool.v1.Generation
  (NOT_SERVING while Redis is unreachable). The port comes from `--listen` /
  `LORAPOOL_LISTEN` (default 50051). With TLS (`LORAPOOL_TLS_CERT` set) the check trusts
  `LORAPOOL_HEALTHCHECK_CA` (default: the server certificate itself, right for a
  self-signed one), expects the name `LORAPOOL_HEALTHCHECK_SERVER_NAME` (default
  localhost) and, under mTLS, presents `LORAPOOL_HEALTHCHECK_CLIENT_CERT` / `_KEY`.
- worker: its Prometheus endpoint (`--metrics-port` / `LORAPOOL_WORKER_METRICS_PORT`)
  answers and shows a running step loop: the loop sets the free-page and active-job
  gauges every tick, and both stay 0 until the model is loaded and the first tick ran.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

DEFAULT_GRPC_PORT = "50051"
TIMEOUT_S = 4.0
READY_GAUGES = ("lorapool_worker_free_pages", "lorapool_worker_active_jobs")


def command_line() -> list[str]:
    """The main process's argv: PID 1, or its first child when PID 1 is an init."""
    for pid in ("1", *_children("1")):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if argv and not Path(argv[0]).name.endswith("init"):
            return argv
    return []


def _children(pid: str) -> list[str]:
    found = []
    for stat in sorted(Path("/proc").glob("[0-9]*/stat"), key=lambda p: int(p.parent.name)):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after the last ")".
            ppid = stat.read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue
        if ppid == pid:
            found.append(stat.parent.name)
    return found


def flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def role_of(argv: list[str]) -> str:
    names = {Path(a).name for a in argv}
    if names & {"lorapool-gateway", "gateway"}:
        return "gateway"
    if names & {"lorapool-worker", "worker"}:
        return "worker"
    return "other"


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def check_gateway(argv: list[str]) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    listen = flag(argv, "--listen") or os.environ.get("LORAPOOL_LISTEN") or ""
    port = listen.rsplit(":", 1)[-1] if ":" in listen else DEFAULT_GRPC_PORT
    target = f"127.0.0.1:{port}"
    cert = os.environ.get("LORAPOOL_TLS_CERT") or flag(argv, "--tls-cert")
    if cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(os.environ.get("LORAPOOL_HEALTHCHECK_CA") or cert),
            private_key=_read(os.environ.get("LORAPOOL_HEALTHCHECK_CLIENT_KEY")),
            certificate_chain=_read(os.environ.get("LORAPOOL_HEALTHCHECK_CLIENT_CERT")),
        )
        name = os.environ.get("LORAPOOL_HEALTHCHECK_SERVER_NAME", "localhost")
        options = [("grpc.ssl_target_name_override", name)]
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    request = health_pb2.HealthCheckRequest(service="lorapool.v1.Generation")
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        return f"health check failed: {exc.code().name}"  # type: ignore[attr-defined]
    finally:
        channel.close()
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"gateway is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def check_worker(argv: list[str]) -> str | None:
    port = flag(argv, "--metrics-port") or os.environ.get("LORAPOOL_WORKER_METRICS_PORT")
    if not port or port == "0":
        return "no metrics port (set LORAPOOL_WORKER_METRICS_PORT)"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT_S) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return f"metrics endpoint down: {exc}"
    values = {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in text.splitlines())
        if name in READY_GAUGES
    }
    if not any(values.get(g, 0.0) > 0 for g in READY_GAUGES):
        return "worker not ready: the step loop has not ticked yet (model loading?)"
    return None


CHECKS: dict[str, Callable[[list[str]], str | None]] = {
    "gateway": check_gateway,
    "worker": check_worker,
    "other": lambda _argv: None,
}


def main(args: list[str]) -> int:
    argv = command_line()
    role = args[0] if args else role_of(argv)
    if role not in CHECKS:
        sys.stderr.write(f"usage: lorapool-healthcheck [{'|'.join(CHECKS)}]\n")
        return 2
    problem = CHECKS[role](argv)
    if problem is not None:
        sys.stdout.write(f"unhealthy: {problem}\n")
        return 1
    sys.stdout.write(f"{role}: healthy\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
