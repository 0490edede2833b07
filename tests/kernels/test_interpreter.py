"""The conftest's promise: without CUDA the kernels run through Triton's interpreter; a
compiled kernel handed CPU tensors is refused with a clear message, not a crash."""

from __future__ import annotations

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from tests.kernels.util import HAS_CUDA
from worker.kernels import bgmv, paged_attention, sgmv
from worker.kernels.triton_util import check_launchable, interpreted


@pytest.mark.skipif(HAS_CUDA, reason="with CUDA the kernels compile")
def test_kernels_are_interpreted_without_cuda() -> None:
    kernels = [sgmv._shrink_kernel, sgmv._expand_kernel, bgmv._shrink_kernel, bgmv._expand_kernel]
    kernels += [paged_attention._decode_kernel, paged_attention._varlen_kernel]
    assert all(interpreted(k) for k in kernels)
    check_launchable(sgmv._shrink_kernel, torch.device("cpu"))


def _noop(x_ptr, N: tl.constexpr):  # type: ignore[no-untyped-def]
    pass


def test_compiled_kernel_refuses_cpu_tensors() -> None:
    compiled = JITFunction(_noop)
    assert not interpreted(compiled)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        check_launchable(compiled, torch.device("cpu"))
