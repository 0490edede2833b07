"""The real stack for end-to-end tests: gateway and workers as subprocesses, real registry."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker import keys
from tests.serving.redis_proc import free_port

ROOT = Path(__file__).resolve().parents[2]


class Stack:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.gateway: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        out = (self.logs / log_name).open("ab")
        return subprocess.Popen(
            [sys.executable, *argv], env=self.env, cwd=ROOT, stdout=out, stderr=out
        )

    def start_gateway(self) -> None:
        self.gateway = self._spawn(["-m", "gateway", "--listen", self.target], "gateway.log")
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(self.target))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
        raise RuntimeError("gateway did not become healthy")

    def start_worker(self, name: str) -> None:
        port = free_port()
        argv = ["-m", "worker", "--name", name, "--metrics-port", str(port), "--drain", "15"]
        self.workers[name] = (self._spawn(argv, f"{name}.log"), port)

    def wait_workers(self, timeout_s: float = 300) -> None:
        client = redis.Redis.from_url(self.env["LORAPOOL_REDIS_URL"])
        deadline = time.monotonic() + timeout_s
        for name, (proc, _) in self.workers.items():
            while not client.exists(keys.heartbeat(name)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"worker {name} did not start; see {self.logs / (name + '.log')}"
                    )
                time.sleep(0.2)

    def kill_worker(self, name: str) -> None:
        proc, _ = self.workers.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)

    def terminate_worker(self, name: str, timeout_s: float = 60) -> int:
        """SIGTERM, then wait for the drain and the exit; returns the exit code."""
        proc, _ = self.workers.pop(name)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout_s)

    def metric(self, name: str, metric: str) -> float:
        port = self.workers[name][1]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        line = next(ln for ln in text.splitlines() if ln.startswith(metric + " "))
        return float(line.split()[1])

    def stop(self) -> None:
        procs = [p for p, _ in self.workers.values()] + ([self.gateway] if self.gateway else [])
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def base_env(
    data_dir: Path, redis_url: str, database_url: str, base_model_dir: Path
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LORAPOOL_DATA_DIR=str(data_dir),
        LORAPOOL_REDIS_URL=redis_url,
        LORAPOOL_DATABASE_URL=database_url,
        LORAPOOL_BASE_MODEL_DIR=str(base_model_dir),
        LORAPOOL_MAX_DEPTH_PER_ADAPTER="6",
        LORAPOOL_MAX_DEPTH_TOTAL="10",
        LORAPOOL_MAX_NUM_SEQS="8",
        LORAPOOL_NUM_PAGES="512",
        LORAPOOL_LOG_LEVEL="INFO",
        OMP_NUM_THREADS="1",  # two workers and the tests share a small CPU
        OMP_WAIT_POLICY="PASSIVE",
    )
    env.pop("LORAPOOL_API_TOKENS", None)
    env.pop("LORAPOOL_ADMIN_TOKENS", None)
    return env


def serve_env(**settings: str) -> dict[str, str]:
    """The caller's environment without LORAPOOL_* settings (the model cache dir stays), on
    a small page pool and one passive OpenMP thread; `settings` are added."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPOOL_")}
    if "LORAPOOL_CACHE_DIR" in os.environ:
        env["LORAPOOL_CACHE_DIR"] = os.environ["LORAPOOL_CACHE_DIR"]
    env.update(
        LORAPOOL_NUM_PAGES="256",
        LORAPOOL_MAX_NUM_SEQS="4",
        OMP_NUM_THREADS="1",
        OMP_WAIT_POLICY="PASSIVE",
    )
    env.update(settings)
    return env


class Serve:
    """`lorapool serve` as a subprocess; its log (with its children's) in one file."""

    BANNER = "lorapool is serving"

    def __init__(self, env: dict[str, str], log: Path, *flags: str) -> None:
        self.env = env
        self.log = log
        self.target = f"127.0.0.1:{free_port()}"
        out = log.open("ab")
        argv = [sys.executable, "-m", "lorapool.cli", "serve", "--listen", self.target, *flags]
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=out)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout_s: float = 120, after: int = 0) -> re.Match[str]:
        """The first match of `pattern` in the log past offset `after`; fails if serve exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = re.compile(pattern).search(self.text(), after)
            if found:
                return found
            assert self.proc.poll() is None, f"serve exited; log:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{self.text()}"
            time.sleep(0.2)

    def wait_serving(self, timeout_s: float = 600) -> None:
        self.wait_log(re.escape(self.BANNER), timeout_s)

    def pid(self, child: str) -> int:
        """The pid of the latest start of `child` (redis, gateway, worker-1, ...)."""
        found = re.findall(rf"started {re.escape(child)} \(pid (\d+)\)", self.text())
        assert found, f"{child} never started:\n{self.text()}"
        return int(found[-1])

    def metrics_url(self, child: str) -> str:
        return self.wait_log(rf"{re.escape(child)} (http://127\.0\.0\.1:\d+/metrics)").group(1)

    def stop(self, timeout_s: float = 180) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
