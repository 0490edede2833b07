"""HF models on bitsandbytes layers, computing bnb's reference semantics on every CPU.

On a CPU with AVX512-BF16, bnb's `Linear4bit.forward` in eval mode repacks its weight once
and from then on runs a bf16 GEMV kernel whatever `bnb_4bit_compute_dtype` says (bnb 0.50:
`support_avx512bf16_for_cpu`). That kernel is bnb's speed path, not its semantics: outputs
move by bf16 rounding (up to ~2e-2 on a tiny random model against dequantize-then-matmul in
fp32). A parity test compares against the semantics — dequantize to the compute dtype, then
matmul, which is what bnb does on every other CPU and on CUDA — so the reference turns the
speed path off. The same test on a machine without AVX512-BF16 needs no change.
"""

from __future__ import annotations

from typing import Any

import bitsandbytes as bnb


def without_cpu_bf16_kernel(model: Any) -> Any:
    """`model`, with every bnb 4-bit layer on bnb's reference (dequantize + matmul) path."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model
