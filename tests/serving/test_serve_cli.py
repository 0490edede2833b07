"""`lorapool serve` from nothing (own Redis, SQLite, samples) and `lorapool generate` through it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serving.redis_proc import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
HAS_UPPER = (ROOT / "samples" / "adapters" / "upper" / "adapter_config.json").is_file()


def lorapool(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorapool.cli", *args]


def test_serve_then_generate(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPOOL_")}
    env.update(
        LORAPOOL_DATA_DIR=str(tmp_path / "data"),
        LORAPOOL_NUM_PAGES="256",
        LORAPOOL_MAX_NUM_SEQS="4",
    )
    if "LORAPOOL_CACHE_DIR" in os.environ:
        env["LORAPOOL_CACHE_DIR"] = os.environ["LORAPOOL_CACHE_DIR"]
    target = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "serve.log").open("w+")
    serve = subprocess.Popen(
        lorapool("serve", "--listen", target),
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while "lorapool is serving" not in (tmp_path / "serve.log").read_text():
            assert serve.poll() is None and time.monotonic() < deadline, (
                tmp_path / "serve.log"
            ).read_text()
            time.sleep(0.5)
        adapter = ["--adapter", "upper"] if HAS_UPPER else []
        reply = subprocess.run(
            lorapool(
                "generate", "--target", target, *adapter, "--max-tokens", "16", "Name three colors."
            ),
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert reply.returncode == 0, reply.stderr
        assert reply.stdout.strip()
        if HAS_UPPER:
            letters = [c for c in reply.stdout if c.isalpha()]
            assert sum(c.isupper() for c in letters) > 0.8 * len(letters)
        missing = subprocess.run(
            lorapool("generate", "--target", target, "--adapter", "nope", "hi"),
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert missing.returncode != 0 and "NOT_FOUND" in missing.stderr
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(90)
    assert serve.returncode == 0


def test_serve_refuses_open_non_loopback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPOOL_")}
    out = subprocess.run(
        lorapool("serve", "--listen", "0.0.0.0:0"),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "refusing" in out.stderr
