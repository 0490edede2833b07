"""No code in the repository calls torch.load or pickle.load(s) (user data is never unpickled)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".venv", ".git", "node_modules", "build", "dist", ".mypy_cache", ".ruff_cache"}
FORBIDDEN = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler")}


def python_files() -> list[Path]:
    return [
        path
        for path in REPO.rglob("*.py")
        if not SKIP_DIRS.intersection(path.relative_to(REPO).parts)
    ]


def forbidden_uses(tree: ast.AST) -> list[str]:
    """Attribute uses like torch.load / pickle.load, and `from pickle import load`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in FORBIDDEN:
                found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle"):
            names = {alias.name for alias in node.names}
            bad = {name for module, name in FORBIDDEN if module == node.module} & names
            found.extend(f"from {node.module} import {name} (line {node.lineno})" for name in bad)
    return found


def test_detector_finds_the_calls() -> None:
    source = "import torch, pickle\ntorch.load('x')\npickle.loads(b'')\nfrom pickle import load\n"
    assert len(forbidden_uses(ast.parse(source))) == 3


def test_no_unpickling_anywhere_in_the_source_tree() -> None:
    files = python_files()
    assert any(path.parts[-2:] == ("adapter_store", "validation.py") for path in files)
    offenders = {
        str(path.relative_to(REPO)): uses
        for path in files
        if (uses := forbidden_uses(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert offenders == {}
