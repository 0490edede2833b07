"""Whether the Triton kernels can be imported here, answered without importing Triton."""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """True where Triton is installed (the project depends on it on Linux only)."""
    return importlib.util.find_spec("triton") is not None
