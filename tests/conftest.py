"""The whole suite: Triton kernels run through Triton's interpreter when there is no CUDA.

Triton reads TRITON_INTERPRET when `triton` is first imported (its own tl.sum, tl.cumsum
included), and peft or bitsandbytes may import it while tests are collected: so the
variable is set here, in the root conftest, before any test module is imported. With
CUDA nothing changes: the kernels compile.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton was imported before tests/conftest.py could set TRITON_INTERPRET"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_unconfigure(config: object) -> None:
    """A test that leaks a non-daemon thread (a worker loop whose stop was never set) would
    keep the interpreter alive after the summary, and CI would time out with every test
    green. Wait for such threads a while, then name them and end the process with an error."""
    import threading

    leaked = [t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
    for thread in leaked:
        thread.join(30)
    alive = [t.name for t in leaked if t.is_alive()]
    if alive:
        sys.stderr.write(f"\ntests leaked non-daemon threads that never ended: {alive}\n")
        sys.stderr.flush()
        os._exit(3)
