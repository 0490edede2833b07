"""lora_paged_ref (torch, gather-based) against the float64 loop: no Triton involved."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.kernels.lora_checks import check_lora
from tests.kernels.paged_lora import POPULARITY, SMALL, lora_case, row_widths
from tests.kernels.util import DTYPES
from worker.kernels import lora_paged_ref as ref

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "dtype, popularity, batch", list(itertools.product(DTYPES, POPULARITY, (1, 6)))
)
def test_sgmv_reference(dtype: torch.dtype, popularity: str, batch: int) -> None:
    case = lora_case("sgmv", popularity, batch, dtype, SMALL, CPU, seed=batch)
    for group in range(4):
        check_lora(case, group, ref.sgmv_shrink, ref.sgmv_expand)


@pytest.mark.parametrize(
    "dtype, popularity, batch", list(itertools.product(DTYPES, POPULARITY, (1, 9)))
)
def test_bgmv_reference(dtype: torch.dtype, popularity: str, batch: int) -> None:
    case = lora_case("bgmv", popularity, batch, dtype, SMALL, CPU, seed=batch)
    for group in range(4):
        check_lora(case, group, ref.bgmv_shrink, ref.bgmv_expand)


def test_segment_row_slots() -> None:
    case = lora_case("sgmv", "base_rows", 5, torch.float32, SMALL, CPU, seed=3)
    assert ref.segment_row_slots(case.meta).tolist() == case.row_slot


def test_layout_scatters_pages_and_rows_straddle_adjacent_ones() -> None:
    """The test pools are what the kernels must handle: pages out of order, rows across
    boundaries of adjacent pages only, NaN wherever no row lives."""
    case = lora_case("sgmv", "distinct", 6, torch.float32, SMALL, CPU, seed=6)
    meta, e = case.meta, SMALL.page_elems
    widths = row_widths(meta, SMALL)  # [R]
    start_page, end_page = meta.row_addr // e, (meta.row_addr + widths - 1) // e
    crossing = start_page != end_page
    assert crossing.any(), "no row runs across a page boundary"
    assert (end_page[crossing] == start_page[crossing] + 1).all()
    order = torch.unique_consecutive(start_page)
    assert not (order[1:] == order[:-1] + 1).all(), "pages were taken in order"
    owned = torch.zeros_like(meta.pool, dtype=torch.bool)
    for addr, w in zip(meta.row_addr.tolist(), widths.tolist(), strict=True):
        owned[addr : addr + w] = True
    assert meta.pool[~owned].isnan().all() and not meta.pool[owned].isnan().any()
