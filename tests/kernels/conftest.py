"""Kernel tests: on CUDA when there is one, else on the CPU through Triton's interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton when there is no
CUDA; a kernel that did not come out interpreted fails here rather than being skipped.
With CUDA the kernels compile, and the `gpu`-marked tests run too.
"""

from __future__ import annotations

import pytest

from worker.kernels.triton_available import triton_available

# test modules that launch Triton kernels
LAUNCHING = ("test_sgmv.py", "test_bgmv.py", "test_paged_attention.py", "test_interpreter.py")

if not triton_available():  # triton is a dependency on Linux only
    collect_ignore = [*LAUNCHING, "test_bench_kernels.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not triton_available():
        return
    from tests.kernels.util import kernels_run_here

    if not kernels_run_here():
        raise pytest.UsageError(
            "Triton kernels would neither compile (no CUDA) nor run interpreted: "
            "triton was imported before tests/conftest.py set TRITON_INTERPRET"
        )
