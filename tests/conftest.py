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
