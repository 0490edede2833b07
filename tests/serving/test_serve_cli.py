"""`lorapool serve` from nothing (own Redis, SQLite, samples) and `lorapool generate` through it."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.serving.stack import Serve, serve_env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
HAS_UPPER = (ROOT / "samples" / "adapters" / "upper" / "adapter_config.json").is_file()
API_TOKEN, ADMIN_TOKEN = "serve-api-s3cret", "serve-admin-s3cret"


def lorapool(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorapool.cli", *args]


def generate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        lorapool("generate", *args),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_serve_with_tokens_then_generate(tmp_path: Path) -> None:
    env = serve_env(
        LORAPOOL_DATA_DIR=str(tmp_path / "data"),
        LORAPOOL_API_TOKENS=API_TOKEN,
        LORAPOOL_ADMIN_TOKENS=ADMIN_TOKEN,
    )
    serve = Serve(env, tmp_path / "serve.log")
    try:
        serve.wait_serving()
        # The banner points at the token without printing it, and at the metrics ports.
        assert API_TOKEN not in serve.text() and ADMIN_TOKEN not in serve.text()
        assert f'--target {serve.target} --token "$LORAPOOL_API_TOKEN"' in serve.text()
        for child, family in (("gateway", "lorapool_gateway_"), ("worker-1", "lorapool_worker_")):
            url = serve.metrics_url(child)
            assert family in urllib.request.urlopen(url, timeout=60).read().decode()

        target = ["--target", serve.target, "--max-tokens", "16"]
        adapter = ["--adapter", "upper"] if HAS_UPPER else []
        reply = generate(env, *target, "--token", API_TOKEN, *adapter, "Name three colors.")
        assert reply.returncode == 0, reply.stderr
        assert reply.stdout.strip()
        if HAS_UPPER:
            letters = [c for c in reply.stdout if c.isalpha()]
            assert sum(c.isupper() for c in letters) > 0.8 * len(letters)
        missing = generate(env, *target, "--token", API_TOKEN, "--adapter", "nope", "hi")
        assert missing.returncode != 0 and "NOT_FOUND" in missing.stderr
        refused = generate(env, *target, "hi")
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr
    finally:
        serve.proc.send_signal(signal.SIGINT)  # Ctrl-C
        code = serve.proc.wait(180)
    assert code == 0, serve.text()
    log = serve.text()
    assert log.index("stopping worker-1") < log.index("stopping gateway")  # workers first


@pytest.mark.parametrize(
    "tokens", [{}, {"LORAPOOL_ADMIN_TOKENS": "admin-only"}], ids=["no-tokens", "admin-only"]
)
def test_serve_refuses_open_generate_beyond_loopback(tokens: dict[str, str]) -> None:
    out = subprocess.run(
        lorapool("serve", "--listen", "0.0.0.0:0"),
        env=serve_env(**tokens),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2 and "refusing" in out.stderr and "LORAPOOL_API_TOKENS" in out.stderr
