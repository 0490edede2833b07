"""One check for every shrink/expand pair (Triton SGMV, BGMV, and the torch reference)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tests.kernels.paged_lora import LoraCase, lora_f64
from tests.kernels.util import FLOAT32_BOUND, ULP_BOUND, assert_close

Shrink = Callable[..., torch.Tensor]
Expand = Callable[..., None]


def check_lora(
    case: LoraCase, group: int, shrink: Shrink, expand: Expand, layer: int = 1, **kw: Any
) -> None:
    """shrink and expand of one group against the float64 loop.

    v must match inside each row's rank and be exactly zero elsewhere; the expand then gets
    v poisoned with NaN outside the rows' ranks (it must not read there), y starts as
    random base values, and every element outside the targeted projections of rows with
    an adapter must come back bit-identical.
    """
    meta, shapes = case.meta, case.shapes
    dtype, device = meta.pool.dtype, meta.pool.device
    gen = torch.Generator().manual_seed(1000 + group)
    x = torch.randn(len(case.row_slot), shapes.in_width(group), generator=gen).to(dtype)
    ref = lora_f64(x, case.row_slot, case.adapters, shapes, layer, group, meta.max_rank)

    v = shrink(x.to(device), meta, layer, group, **kw)  # [T, max_rank] float32
    assert v.dtype == torch.float32 and tuple(v.shape) == tuple(ref.v.shape)
    if ref.v_used.any():
        assert_close(v, ref.v, FLOAT32_BOUND, "shrink")
    assert (v.cpu()[~ref.v_used] == 0).all(), "shrink: v not zero past a row's rank"

    v_in = v.clone()
    v_in[~ref.v_used.to(device)] = float("nan")
    y0 = torch.randn(x.shape[0], shapes.out_total(group), generator=gen).to(dtype)
    y = y0.clone().to(device)
    expand(y, v_in, meta, layer, group, shapes.out_cols(group), **kw)
    assert_close(y, y0.double() + ref.delta, ULP_BOUND[dtype], "expand")
    assert torch.equal(y.cpu()[~ref.touched], y0[~ref.touched]), "expand: untouched rows changed"
    if ref.touched.any():  # the adapters' rows did change
        assert not torch.equal(y.cpu()[ref.touched], y0[ref.touched])
