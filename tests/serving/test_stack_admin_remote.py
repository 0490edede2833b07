"""`lorapool-admin --target`: the registry through a real gateway's admin API (SQLite, blobs)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from adapter_store.basemodel import BaseModelSpec
from lorapool.admin import main
from tests.adapter_store.builders import write_lora
from tests.serving.certs import make_certs
from tests.serving.fakes import GatewayThread
from tests.serving.redis_proc import free_port
from tests.serving.test_gateway import ADMIN, API, settings
from tests.serving.test_store_registry import base_dir, store_registry

__all__ = ["base_dir"]  # a module-scoped fixture this file uses
Run = tuple[int, str, str]


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path, base_dir: Path) -> Iterator[GatewayThread]:
    gw = GatewayThread(
        settings(redis_url, registry_cache_s=0.0), store_registry(tmp_path, base_dir)
    )  # type: ignore[arg-type]
    yield gw
    gw.stop()


@pytest.fixture
def adapter(tmp_path: Path, base_dir: Path) -> Path:
    return write_lora(tmp_path / "lora", BaseModelSpec.from_hf_dir(base_dir))


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAPOOL_ADMIN_TOKEN", raising=False)


def admin(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(result: Run, *texts: str) -> None:
    code, _, err = result
    assert code == 1 and err.count("\n") == 1 and err.startswith("lorapool-admin: error:"), err
    for text in texts:
        assert text in err


def test_upload_list_show_delete_through_the_gateway(
    gateway: GatewayThread, adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    remote = ["--target", gateway.target, "--token", ADMIN]
    code, out, err = admin(capsys, *remote, "upload", str(adapter), "--name", "support-bot")
    assert code == 0, err
    ref, digest = out.split()
    assert ref == "support-bot:1" and len(digest) == 64

    code, out, _ = admin(capsys, *remote, "list", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["support-bot"]["digest"] == digest
    assert rows["support-bot"]["version"] == 1 and rows["support-bot"]["status"] == "READY"
    code, out, _ = admin(capsys, *remote, "list")
    assert code == 0 and "support-bot" in out and digest[:12] in out  # the local table

    code, out, _ = admin(capsys, *remote, "show", "support-bot:1", "--json")
    assert code == 0 and json.loads(out)["digest"] == digest
    code, out, _ = admin(capsys, *remote, "show", "support-bot:1")
    assert code == 0 and "support-bot" in out and digest[:32] in out

    assert admin(capsys, *remote, "delete", "support-bot:1")[:2] == (0, "deleted support-bot:1\n")
    one_line_error(admin(capsys, *remote, "show", "support-bot:1"), "NOT_FOUND", "support-bot")


def test_tokens_from_env_and_refusals_name_the_status(
    gateway: GatewayThread,
    adapter: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = ["--target", gateway.target]
    one_line_error(admin(capsys, *target, "show", "x"), "UNAUTHENTICATED", "--token")
    one_line_error(
        admin(capsys, *target, "--token", API, "show", "x"), "PERMISSION_DENIED", "admin token"
    )
    monkeypatch.setenv("LORAPOOL_ADMIN_TOKEN", ADMIN)
    code, out, err = admin(capsys, *target, "upload", str(adapter), "--name", "from-env")
    assert code == 0 and out.startswith("from-env:1 "), err
    one_line_error(admin(capsys, *target, "show", "from-env:7"), "NOT_FOUND")
    one_line_error(admin(capsys, *target, "show", "bad/name"), "INVALID_ARGUMENT")


def test_local_only_commands_and_bad_targets_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    dead = ["--target", f"127.0.0.1:{free_port()}", "--timeout", "10"]
    one_line_error(admin(capsys, *dead, "list"), "UNAVAILABLE")
    one_line_error(admin(capsys, *dead, "gc"), "local registry only")
    one_line_error(admin(capsys, *dead, "migrate"), "local registry only")
    one_line_error(admin(capsys, *dead, "list", "--all"), "local registry only")
    one_line_error(admin(capsys, *dead, "upload", str(tmp_path), "--name", "x"), "holds no")


def test_tls_target(
    redis_url: str,
    tmp_path: Path,
    base_dir: Path,
    adapter: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    certs = make_certs(tmp_path)
    gw = GatewayThread(
        settings(redis_url, tls_cert=certs["server_pem"], tls_key=certs["server_key"]),
        store_registry(tmp_path, base_dir),
    )  # type: ignore[arg-type]
    try:
        remote = ["--target", gw.target, "--token", ADMIN, "--tls-ca", str(certs["ca_pem"])]
        code, out, err = admin(capsys, *remote, "upload", str(adapter), "--name", "tls-bot")
        assert code == 0 and out.startswith("tls-bot:1 "), err
        code, out, _ = admin(capsys, *remote, "list", "--json")
        assert code == 0 and [r["name"] for r in json.loads(out)] == ["tls-bot"]
    finally:
        gw.stop()


def test_the_console_script_is_the_client_with_target() -> None:
    """`lorapool-admin` must be lorapool.admin:main (adapter_store cannot import the stubs)."""
    [script] = [e for e in entry_points(group="console_scripts") if e.name == "lorapool-admin"]
    assert script.value == "lorapool.admin:main"
