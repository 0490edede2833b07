"""Triton SGMV (worker/kernels/sgmv.py) against the float64 loop, over scattered pages.

Sweep: dtype × popularity × batch (segments of 1..7 rows) with ranks 1..256 mixed in every
batch, each case on one group (the groups cycle through the sweep); then small tiles so
segments span several row tiles, ranks several rank tiles and split-K atomics; uniform
extreme ranks; argument checks. On the CPU through the interpreter; the same on CUDA
with SmolLM2's widths under the `gpu` mark.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from tests.kernels.lora_checks import check_lora
from tests.kernels.paged_lora import POPULARITY, SMALL, SMOLLM2, lora_case
from tests.kernels.util import DTYPES, GPU, KERNEL_DEVICE
from worker.kernels.sgmv import SgmvTiles, sgmv_expand, sgmv_shrink

SWEEP = [
    pytest.param(dtype, popularity, batch, i % 4, id=f"{dtype}-{popularity}-b{batch}-g{i % 4}")
    for i, (dtype, popularity, batch) in enumerate(itertools.product(DTYPES, POPULARITY, (1, 5)))
]


@pytest.mark.parametrize("dtype, popularity, batch, group", SWEEP)
def test_sgmv(dtype: torch.dtype, popularity: str, batch: int, group: int) -> None:
    case = lora_case("sgmv", popularity, batch, dtype, SMALL, KERNEL_DEVICE, seed=batch)
    check_lora(case, group, sgmv_shrink, sgmv_expand)


SMALL_TILES = SgmvTiles(block_m=16, block_r=16, block_k=16, block_n=16, split_k=2)


@pytest.mark.parametrize("dtype, group", [(DTYPES[0], 0), (DTYPES[1], 2), (DTYPES[2], 3)])
def test_sgmv_small_tiles(dtype: torch.dtype, group: int) -> None:
    """Segments of up to 40 rows over 16-row tiles, 16-rank tiles, split-K over 16 features."""
    case = lora_case(
        "sgmv", "skewed", 3, dtype, SMALL, KERNEL_DEVICE, seed=7, ranks=(3, 16, 40), max_len=40
    )
    check_lora(case, group, sgmv_shrink, sgmv_expand, tiles=SMALL_TILES)


@pytest.mark.parametrize("rank", [1, 256])
def test_sgmv_uniform_extreme_rank(rank: int) -> None:
    case = lora_case("sgmv", "uniform", 4, torch.bfloat16, SMALL, KERNEL_DEVICE, 2, (rank,))
    check_lora(case, 0, sgmv_shrink, sgmv_expand)


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [pytest.param(b, marks=GPU) for b in (1, 16, 64)])
def test_sgmv_gpu(batch: int, dtype: torch.dtype, popularity: str) -> None:
    """SmolLM2's widths on CUDA, segments of up to 80 rows, all groups, vector loads."""
    case = lora_case("sgmv", popularity, batch, dtype, SMOLLM2, torch.device("cuda"), 5, max_len=80)
    for group in range(4):
        check_lora(case, group, sgmv_shrink, sgmv_expand, row_align=8)


def test_sgmv_checks_its_arguments() -> None:
    case = lora_case("sgmv", "distinct", 2, torch.float32, SMALL, KERNEL_DEVICE, seed=1)
    meta, tokens = case.meta, len(case.row_slot)
    x = torch.randn(tokens, SMALL.hidden, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="x: dtype torch.int64"):
        sgmv_shrink(x.long(), meta, 1, 0)
    with pytest.raises(ValueError, match="meta.pool: dtype torch.float32, expected torch.float16"):
        sgmv_shrink(x.half(), meta, 1, 0)
    with pytest.raises(ValueError, match="the last dimension must be contiguous"):
        sgmv_shrink(x.t().contiguous().t(), meta, 1, 0)
    with pytest.raises(ValueError, match="meta.seg_start: dtype torch.int64"):
        sgmv_shrink(x, replace(meta, seg_start=meta.seg_start.long()), 1, 0)
    with pytest.raises(ValueError, match="meta.row_addr: on meta, expected"):
        sgmv_shrink(x, replace(meta, row_addr=meta.row_addr.to("meta")), 1, 0)
    with pytest.raises(ValueError, match="layer 2 out of range"):
        sgmv_shrink(x, meta, 2, 0)
    with pytest.raises(ValueError, match="row_align 16 does not divide the row width 40"):
        sgmv_shrink(x, meta, 1, 0, row_align=16)
    v = sgmv_shrink(x, meta, 1, 0)
    y = torch.zeros(tokens, SMALL.out_total(0), device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="out_cols: 2 parts for group qkv, expected 3"):
        sgmv_expand(y, v, meta, 1, 0, SMALL.out_cols(0)[:2])
    with pytest.raises(ValueError, match="outside y's"):
        sgmv_expand(y[:, :-1], v, meta, 1, 0, SMALL.out_cols(0))
    with pytest.raises(ValueError, match="v: dtype torch.float16"):
        sgmv_expand(y, v.half(), meta, 1, 0, SMALL.out_cols(0))
