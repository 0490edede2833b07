"""`lorapool-admin` end to end on both databases: exit codes, stdout, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapter_store.basemodel import BaseModelSpec
from adapter_store.cli import main
from tests.adapter_store.builders import lora_config, lora_tensors, write_adapter, write_lora
from tests.adapter_store.conftest import TINY_CONFIG

Run = tuple[int, str, str]
BASE = BaseModelSpec.from_config_dict(TINY_CONFIG)


@pytest.fixture
def flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str) -> list[str]:
    for key in list(os.environ):
        if key.startswith("LORAPOOL_"):
            monkeypatch.delenv(key)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "config.json").write_text(json.dumps(TINY_CONFIG))
    return [
        "--data-dir",
        str(tmp_path / "data"),
        "--database-url",
        database_url,
        "--blob-dir",
        str(tmp_path / "blobs"),
        "--base-model-dir",
        str(base_dir),
        "--max-rank",
        "16",
    ]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(result: Run, text: str) -> None:
    code, _, err = result
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("lorapool-admin: error:")
    assert text in err


def test_upload_list_show_delete_gc(
    flags: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path, unique_name: str
) -> None:
    adapter_dir = write_lora(tmp_path / "adapter", BASE, seed=hash(unique_name) % 2**31)
    code, out, _ = run(
        capsys, *flags, "upload", str(adapter_dir), "--name", unique_name, "--description", "demo"
    )
    assert code == 0
    ref, digest = out.split()
    assert ref == f"{unique_name}:1"
    assert (tmp_path / "blobs" / "sha256" / digest[:2] / digest[2:]).is_file()

    code, out, _ = run(capsys, *flags, "list", "--json")
    listed = [a for a in json.loads(out) if a["name"] == unique_name]
    assert code == 0 and [(a["version"], a["digest"], a["description"]) for a in listed] == [
        (1, digest, "demo")
    ]
    code, out, _ = run(capsys, *flags, "list")
    assert code == 0 and unique_name in out
    code, out, _ = run(capsys, *flags, "show", unique_name, "--json")
    assert code == 0 and json.loads(out)["digest"] == digest
    code, out, _ = run(capsys, *flags, "show", f"{unique_name}:1")
    assert code == 0 and digest[:32] in out  # long values fold across lines

    assert run(capsys, *flags, "delete", unique_name)[:2] == (0, f"deleted {unique_name}:1\n")
    assert_one_line_error(run(capsys, *flags, "show", unique_name), f"no adapter '{unique_name}'")
    code, out, _ = run(capsys, *flags, "gc", "--grace", "0")
    assert code == 0 and out.startswith("deleted 1 blobs")
    assert not (tmp_path / "blobs" / "sha256" / digest[:2] / digest[2:]).exists()


def test_rejected_upload_exits_nonzero_with_one_line(
    flags: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path, unique_name: str
) -> None:
    adapter_dir = write_adapter(tmp_path / "dora", lora_config(use_dora=True), lora_tensors(BASE))
    result = run(capsys, *flags, "upload", str(adapter_dir), "--name", unique_name)
    assert_one_line_error(result, "unsupported adapter feature DoRA")
    code, out, _ = run(capsys, *flags, "list", "--json", "--all")
    assert code == 0 and unique_name not in out
    assert list((tmp_path / "blobs").glob("sha256/*/*")) == []


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["show", "../../etc/passwd"], "invalid adapter name"),
        (["delete", "nope-never-uploaded:3"], "no adapter"),
        (["upload", "/nonexistent/dir", "--name", "x"], "does not exist"),
        (["upload", ".", "--name", "bad/name"], "invalid adapter name"),
    ],
)
def test_errors_are_one_line(
    flags: list[str], capsys: pytest.CaptureFixture[str], argv: list[str], text: str
) -> None:
    assert_one_line_error(run(capsys, *flags, *argv), text)


def test_missing_base_model_is_a_clear_error(
    flags: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = [*flags, "--base-model-dir", str(tmp_path / "no-model")]
    adapter_dir = write_lora(tmp_path / "a", BASE)
    assert_one_line_error(
        run(capsys, *args, "upload", str(adapter_dir), "--name", "x"), "base model config"
    )


def test_migrate_then_use_a_fresh_database(
    empty_database_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["--database-url", empty_database_url, "--blob-dir", str(tmp_path / "b")]
    assert_one_line_error(run(capsys, *args, "list"), "lorapool-admin migrate")
    code, out, _ = run(capsys, *args, "migrate")
    assert code == 0 and "database at head" in out
    assert run(capsys, *args, "list", "--json")[:2] == (0, "[]\n")


def test_console_script_and_env_settings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPOOL_")}
    env |= {"LORAPOOL_DATA_DIR": str(tmp_path / "data"), "LORAPOOL_MAX_RANK": "8"}
    script = Path(sys.executable).parent / "lorapool-admin"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "adapter_store.cli"]
    for argv in (["migrate"], ["list", "--json"]):
        done = subprocess.run(
            [*command, *argv], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "data" / "registry.sqlite3").is_file()
    bad = subprocess.run(
        [*command, "show", "x"],
        env=env | {"LORAPOOL_MAX_RANK": "lots"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0 and "LORAPOOL_MAX_RANK" in bad.stderr


def test_a_missing_registry_is_named_and_not_created(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.startswith("LORAPOOL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("LORAPOOL_DATA_DIR", str(tmp_path / "data"))
    for argv in (["list"], ["show", "upper"], ["delete", "upper:1"]):
        assert_one_line_error(run(capsys, *argv), str(tmp_path / "data" / "registry.sqlite3"))
    assert not (tmp_path / "data" / "registry.sqlite3").exists()
    _, _, err = run(capsys, "list")
    assert "lorapool serve" in err and "lorapool-admin migrate" in err


def test_target_is_served_by_the_lorapool_client_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(run(capsys, "--target", "127.0.0.1:1", "list"), "lorapool-admin")
    assert_one_line_error(run(capsys, "--target", "127.0.0.1:1", "gc"), "local registry only")
    seen: list[str] = []
    assert main(["--target", "h:1", "show", "x"], remote=lambda a: seen.append(a.ref) or 0) == 0
    assert seen == ["x"]
