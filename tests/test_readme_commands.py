"""The README's "Calling it" commands, run in order against a `make serve`-style stack.

`lorapool serve` starts on a fresh per-user data dir (XDG_DATA_HOME in a temp dir, no
LORAPOOL_DATA_DIR: the default every entry point shares) with its own Redis; then every
`.venv/bin/...` line of the README's first sh block under "## Calling it" runs as written,
with the README's address (127.0.0.1:50051) swapped for the test's. Each must exit 0.
`README_UNDER_TEST=path` checks a proposed README before it lands.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving.stack import Serve, serve_env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
README = Path(os.environ.get("README_UNDER_TEST") or ROOT / "README.md")
README_TARGET = "127.0.0.1:50051"
# The console scripts' modules (pyproject [project.scripts]), run with this interpreter.
PROGRAMS = {"lorapool": "lorapool.cli", "lorapool-admin": "lorapool.admin"}


def calling_it(markdown: str) -> list[list[str]]:
    """The commands of the first ```sh block after "## Calling it", comments dropped."""
    section = markdown.split("## Calling it", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no sh block under ## Calling it"
    lines = [shlex.split(line, comments=True) for line in block.group(1).splitlines()]
    return [words for words in lines if words and words[0].startswith(".venv/bin/")]


def kind(words: list[str]) -> str:
    """`lorapool generate`, `lorapool-admin --target list`, ...: what a command exercises."""
    program = words[0].removeprefix(".venv/bin/")
    target = " --target" if "--target" in words else ""
    verb = next(w for w in words[1:] if not w.startswith("-") and w not in (README_TARGET,))
    return f"{program}{target} {verb}"


REQUIRED = {
    "lorapool generate",
    "lorapool run",
    *(f"lorapool-admin {v}" for v in ("upload", "list", "show", "delete")),
    *(f"lorapool-admin --target {v}" for v in ("upload", "list", "show", "delete")),
}


def test_the_readme_covers_every_entry_point() -> None:
    commands = calling_it(README.read_text())
    assert REQUIRED <= {kind(c) for c in commands}
    generate = [c for c in commands if kind(c) == "lorapool generate"]
    adapters = {c[c.index("--adapter") + 1] if "--adapter" in c else "" for c in generate}
    assert {"upper", "json", ""} <= adapters  # two samples and the base model


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Serve, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("readme")
    env = serve_env(XDG_DATA_HOME=str(tmp / "share"))
    serve = Serve(env, tmp / "serve.log")
    try:
        serve.wait_serving()
        yield serve, env | {"LORAPOOL_TARGET": serve.target}
    finally:
        serve.stop()


def test_readme_commands_in_order(stack: tuple[Serve, dict[str, str]]) -> None:
    serve, env = stack
    for words in calling_it(README.read_text()):
        program = PROGRAMS[words[0].removeprefix(".venv/bin/")]
        args = [serve.target if w == README_TARGET else w for w in words[1:]]
        done = subprocess.run(
            [sys.executable, "-m", program, *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        shown = shlex.join(words)
        assert done.returncode == 0, f"{shown}\n{done.stderr}\n--- serve:\n{serve.text()[-4000:]}"
        assert done.stdout.strip(), shown
        if kind(words) == "lorapool generate" and "upper" in words:
            letters = [c for c in done.stdout if c.isalpha()]
            assert sum(c.isupper() for c in letters) > 0.8 * len(letters), done.stdout
    data = Path(env["XDG_DATA_HOME"]) / "lorapool"
    assert (data / "registry.sqlite3").is_file()  # serve and admin used the default data dir
