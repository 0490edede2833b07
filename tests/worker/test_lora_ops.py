"""SGMV and BGMV reference ops against a float64 per-token loop.

Sweep: dtype × rank mix × adapter popularity (uniform, skewed, all-distinct) × batch size.
"""

from __future__ import annotations

import pytest
import torch

from worker.kernels import lora_ref
from worker.kernels.lora_ref import ExpandPart, Segments

RANKS = {"uniform8": [8], "mixed": [4, 8, 16, 64], "tiny-and-big": [1, 128]}
# Relative to the largest output magnitude: the rounding of the input and of the
# rank-r intermediate in that dtype (bf16 keeps 8 bits of mantissa, fp16 11).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def popularity(kind: str, batch: int, num_adapters: int, gen: torch.Generator) -> list[int]:
    """A slot per token row (-1: base model), sorted into runs as the runner does."""
    if kind == "distinct":
        slots = [i % num_adapters for i in range(batch)]
    elif kind == "skewed":  # most rows on adapter 0, some base rows
        slots = [0 if torch.rand(1, generator=gen) < 0.7 else -1 for _ in range(batch)]
    else:
        slots = torch.randint(-1, num_adapters, (batch,), generator=gen).tolist()
    return sorted(slots)


def reference(
    x: torch.Tensor, slots: list[int], a: list[torch.Tensor], b: list[torch.Tensor], s: list[float]
) -> torch.Tensor:
    """y[t] = s_i · x[t] A_iᵀ B_i in float64, one token at a time (A_i: [r, in])."""
    y = torch.zeros(x.shape[0], b[0].shape[1], dtype=torch.float64)
    for t, i in enumerate(slots):
        if i >= 0:
            y[t] = s[i] * (x[t].double() @ a[i].double().t() @ b[i].double())
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ranks", sorted(RANKS))
@pytest.mark.parametrize("kind", ["uniform", "skewed", "distinct"])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_sgmv_and_bgmv_match_float64(dtype: torch.dtype, ranks: str, kind: str, batch: int) -> None:
    gen = torch.Generator().manual_seed(batch)
    n_in, n_out, num_adapters = 48, 40, 6
    rank_of = [RANKS[ranks][i % len(RANKS[ranks])] for i in range(num_adapters)]
    a = [torch.randn(r, n_in, generator=gen).to(dtype) / n_in**0.5 for r in rank_of]
    b = [torch.randn(r, n_out, generator=gen).to(dtype) / r**0.5 for r in rank_of]
    s = [0.5 + i for i in range(num_adapters)]
    x = torch.randn(batch, n_in, generator=gen).to(dtype)
    slots = popularity(kind, batch, num_adapters, gen)
    expected = reference(x, slots, a, b, s)

    def parts(i: int) -> tuple[ExpandPart, ...]:
        return (ExpandPart(slice(0, rank_of[i]), slice(0, n_out), b[i]),)

    segs = Segments.from_rows(slots)
    y = torch.zeros(batch, n_out, dtype=dtype)
    v = lora_ref.sgmv_shrink(
        x, segs, [None if i < 0 else a[i] for i in segs.slots], [s[i] for i in segs.slots]
    )
    lora_ref.sgmv_expand(y, v, segs, [() if i < 0 else parts(i) for i in segs.slots])
    atol = TOL[dtype] * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(y.double(), expected, atol=atol, rtol=0)

    order = torch.randperm(batch, generator=gen)  # BGMV takes rows in any order
    group_slots, rows = lora_ref.group_rows(torch.tensor(slots)[order])
    y2 = torch.zeros(batch, n_out, dtype=dtype)
    v2 = lora_ref.bgmv_shrink(
        x[order], rows, [a[i] for i in group_slots], [s[i] for i in group_slots]
    )
    lora_ref.bgmv_expand(y2, v2, rows, [parts(i) for i in group_slots])
    torch.testing.assert_close(y2.double(), expected[order], atol=atol, rtol=0)


def test_segments_from_rows() -> None:
    segs = Segments.from_rows([-1, -1, 0, 0, 0, 3, 5, 5])
    assert segs.starts == (0, 2, 5, 6)
    assert segs.ends == (2, 5, 6, 8)
    assert segs.slots == (-1, 0, 3, 5)


def test_fused_shrink_with_two_expand_parts_equals_two_projections() -> None:
    """[A_q; A_v] shrunk once, expanded into two column ranges of a fused output."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    a_q, b_q = (
        torch.randn(3, 16, generator=gen, dtype=torch.float64),
        torch.randn(3, 8, generator=gen, dtype=torch.float64),
    )
    a_v, b_v = (
        torch.randn(2, 16, generator=gen, dtype=torch.float64),
        torch.randn(2, 4, generator=gen, dtype=torch.float64),
    )
    segs = Segments.from_rows([0] * 5)
    y = torch.zeros(5, 12, dtype=torch.float64)
    v = lora_ref.sgmv_shrink(x, segs, [torch.cat([a_q, a_v], dim=0)], [0.5])
    fused = (ExpandPart(slice(0, 3), slice(0, 8), b_q), ExpandPart(slice(3, 5), slice(8, 12), b_v))
    lora_ref.sgmv_expand(y, v, segs, [fused])
    torch.testing.assert_close(y[:, :8], 0.5 * x @ a_q.t() @ b_q)
    torch.testing.assert_close(y[:, 8:], 0.5 * x @ a_v.t() @ b_v)
