"""What the Triton kernels share: the dot-product policy, launch checks and the SM count.

Import this (and the kernel modules) only where Triton is installed;
worker.kernels.triton_available answers that without importing it. On a CPU the kernels run through Triton's interpreter,
which must be switched on (TRITON_INTERPRET=1) before the kernel modules are imported:
`@triton.jit` reads it when it decorates. tests/kernels/conftest.py does that.

Dot products. Triton 3.7.1's interpreter computes `tl.dot` on bf16 operands wrongly (it
treats the raw bits as integers), so off the GPU every dot upcasts its operands to float32
and multiplies exactly ("ieee"). On CUDA, fp16/bf16 operands go to the tensor cores with a
float32 accumulator, and float32 operands use "ieee" too (the base model's float32 matmuls
do not use TF32 either).

The kernels call no nested @triton.jit helpers: the interpreter re-patches triton.language
on every nested call (milliseconds per call, per program), which would make the CPU tests
crawl; the few shared lines (the dot policy, the segment-tile map) are written out.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton


def interpreted(kernel: Any) -> bool:
    """Whether `kernel` was decorated under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_launchable(kernel: Any, device: torch.device) -> None:
    """A compiled kernel cannot read CPU tensors; an interpreted one runs anywhere."""
    if device.type == "cpu" and not interpreted(kernel):
        raise ValueError(
            "CPU tensors reach a compiled Triton kernel: set TRITON_INTERPRET=1 before "
            "worker.kernels' Triton modules are imported, or use the torch reference on the CPU"
        )


def native_dot(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether tl.dot takes this dtype's operands as they are (see the module docstring)."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device; 1 elsewhere (the interpreter is serial)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def pow2_at_least(n: int, floor: int = 1) -> int:
    """The smallest power of two ≥ max(n, floor)."""
    return max(floor, triton.next_power_of_2(max(1, n)))
