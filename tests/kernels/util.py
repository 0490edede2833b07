"""Where the kernel tests run, the `gpu` marks, and the error bounds per dtype.

Bounds on ‖out − ref‖ / ‖ref‖ against a float64 reference computed from the same
dtype-rounded inputs, so the only errors are the kernels' own:
- float32 outputs (the shrink's v for every dtype, and float32 models): float32
  accumulation over at most a few thousand terms, ~√K · 2⁻²⁴ ≪ 2·10⁻⁵.
- fp16/bf16 outputs (expand's y, attention): one rounding of the result to the dtype
  (half an ulp with round-to-nearest on a GPU; Triton 3.7.1's interpreter truncates fp32
  to bf16, a whole ulp) plus, on a GPU, the rounding of v or of the softmax
  probabilities to the dtype before the tensor-core product: within one ulp of
  relative error, 2⁻¹⁰ for fp16 and 2⁻⁷ for bf16 (2^(1 − significand bits)).
"""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# small shapes run where the kernels can: CUDA, else the CPU through the interpreter
KERNEL_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

FLOAT32_BOUND = 2e-5
ULP_BOUND = {torch.float32: FLOAT32_BOUND, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def kernels_run_here() -> bool:
    """Whether this process can launch the Triton kernels: compiled on CUDA, or interpreted."""
    from worker.kernels import sgmv
    from worker.kernels.triton_util import interpreted

    return HAS_CUDA or interpreted(sgmv._shrink_kernel)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN anywhere in out makes it NaN, failing any bound)."""
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300))


def assert_close(out: torch.Tensor, ref: torch.Tensor, bound: float, what: str) -> None:
    err = rel_err(out, ref)
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e}"
