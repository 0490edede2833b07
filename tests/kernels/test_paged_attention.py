"""Paged attention (Triton flash-decoding and varlen, and the torch reference) against a
float64 loop, over pages scattered in the KV view (NaN wherever no context lives).

Sweep: dtype × sliding window × (decode: one split or many; varlen: whole prompts, or
chunked prefill beside decodes and a sequence without queries), cycling head layouts
(GQA, MQA with a head_dim that is not a power of two and 3-token pages, MHA). Outputs
start as NaN so unwritten elements fail. The same on CUDA with SmolLM2's and a 7B-class
head layout under the `gpu` mark.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.kernels.paged_kv import PagedBatch, attention_f64, paged_batch
from tests.kernels.util import DTYPES, GPU, KERNEL_DEVICE, ULP_BOUND, assert_close
from worker.kernels import attention_paged_ref
from worker.kernels.paged_attention import decode_attention, paged_attention, varlen_attention

# (heads, kv heads, head_dim, page_tokens)
LAYOUTS = [(6, 2, 16, 4), (4, 1, 24, 3), (4, 4, 16, 8)]
WINDOWS = (None, 6)


def batch_of(
    ctx: list[int], q_lens: list[int], layout: tuple[int, int, int, int], dtype: torch.dtype,
    device: torch.device = KERNEL_DEVICE, seed: int = 0,
) -> PagedBatch:  # fmt: skip
    heads, kv_heads, head_dim, page_tokens = layout
    return paged_batch(
        ctx, q_lens, heads=heads, kv_heads=kv_heads, head_dim=head_dim, page_tokens=page_tokens,
        dtype=dtype, device=device, gen=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def poisoned(b: PagedBatch) -> torch.Tensor:
    return torch.full_like(b.q, float("nan"))


DECODE = [
    pytest.param(dtype, window, part, LAYOUTS[i % 3], id=f"{dtype}-w{window}-p{part}-l{i % 3}")
    for i, (dtype, window, part) in enumerate(itertools.product(DTYPES, WINDOWS, (None, 8)))
]


@pytest.mark.parametrize("dtype, window, partition, layout", DECODE)
def test_decode(
    dtype: torch.dtype, window: int | None, partition: int | None, layout: tuple[int, ...]
) -> None:
    """Contexts of 1..37 positions, and a padded row with none (its output is zeros)."""
    b = batch_of([5, 37, 1, 16, 0], [1] * 5, layout, dtype)  # type: ignore[arg-type]
    ref = attention_f64(b, window)
    out = decode_attention(
        b.q, b.kv, b.layer, b.block_tables, b.context_lens,
        window=window, out=poisoned(b), partition=partition, block_n=16,
    )  # fmt: skip
    assert_close(out, ref, ULP_BOUND[dtype], "decode")
    assert (out[4] == 0).all()


VARLEN = [
    pytest.param(dtype, window, shape, LAYOUTS[i % 3], id=f"{dtype}-w{window}-{shape}-l{i % 3}")
    for i, (dtype, window, shape) in enumerate(
        itertools.product(DTYPES, WINDOWS, ("prefill", "chunked"))
    )
]
SHAPES = {  # (context lengths, query lengths)
    "prefill": ([19, 3, 1], [19, 3, 1]),
    "chunked": ([30, 9, 12, 5], [11, 1, 0, 5]),
}


@pytest.mark.parametrize("dtype, window, shape, layout", VARLEN)
def test_varlen(
    dtype: torch.dtype, window: int | None, shape: str, layout: tuple[int, ...]
) -> None:
    ctx, q_lens = SHAPES[shape]
    b = batch_of(ctx, q_lens, layout, dtype)  # type: ignore[arg-type]
    ref = attention_f64(b, window)
    out = varlen_attention(
        b.q, b.kv, b.layer, b.block_tables, b.context_lens, b.cu_seqlens_q,
        window=window, out=poisoned(b), block_m=16, block_n=16,
    )  # fmt: skip
    assert_close(out, ref, ULP_BOUND[dtype], "varlen")


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference(dtype: torch.dtype, window: int | None) -> None:
    for i, (ctx, q_lens) in enumerate([*SHAPES.values(), ([5, 37, 1, 16, 0], [1] * 5)]):
        b = batch_of(ctx, q_lens, LAYOUTS[i], dtype, torch.device("cpu"), seed=i)
        out = attention_paged_ref.paged_attention(
            b.q, b.kv, b.layer, b.block_tables, b.context_lens, b.cu_seqlens_q, window=window
        )
        assert_close(out, attention_f64(b, window), ULP_BOUND[dtype], "reference")


def test_dispatch_picks_decode_for_one_query_per_sequence() -> None:
    b = batch_of([9, 4, 21], [1, 1, 1], LAYOUTS[0], torch.float32)
    out = paged_attention(b.q, b.kv, b.layer, b.block_tables, b.context_lens, b.cu_seqlens_q)
    dec = decode_attention(b.q, b.kv, b.layer, b.block_tables, b.context_lens)
    assert torch.equal(out, dec)
    assert_close(out, attention_f64(b), ULP_BOUND[torch.float32], "dispatch")


GPU_LAYOUTS = [(9, 3, 64, 16), (32, 8, 128, 16)]  # SmolLM2-135M, a 7B-class GQA model


@pytest.mark.parametrize("window", [None, 256])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", [pytest.param(x, marks=GPU) for x in GPU_LAYOUTS])
def test_attention_gpu(
    layout: tuple[int, int, int, int], dtype: torch.dtype, window: int | None
) -> None:
    """Long contexts (flash-decoding splits by default) and a chunked-prefill batch on CUDA."""
    cuda = torch.device("cuda")
    b = batch_of([1, 700, 2049, 64] * 4, [1] * 16, layout, dtype, cuda)
    out = decode_attention(
        b.q, b.kv, b.layer, b.block_tables, b.context_lens, window=window, out=poisoned(b)
    )
    assert_close(out, attention_f64(b, window), ULP_BOUND[dtype], "decode")
    b = batch_of([300, 1000, 17, 129], [300, 128, 1, 64], layout, dtype, cuda)
    out = varlen_attention(
        b.q,
        b.kv,
        b.layer,
        b.block_tables,
        b.context_lens,
        b.cu_seqlens_q,
        window=window,
        out=poisoned(b),
    )
    assert_close(out, attention_f64(b, window), ULP_BOUND[dtype], "varlen")


def test_attention_checks_its_arguments() -> None:
    b = batch_of([9, 4], [1, 1], LAYOUTS[0], torch.float32)
    args = (b.kv, b.layer, b.block_tables, b.context_lens)
    with pytest.raises(ValueError, match="kv: dtype torch.float32, expected torch.float16"):
        decode_attention(b.q.half(), *args)
    with pytest.raises(ValueError, match="block_tables: dtype torch.int64"):
        decode_attention(b.q, b.kv, b.layer, b.block_tables.long(), b.context_lens)
    with pytest.raises(ValueError, match="does not fit kv's 2 kv heads"):
        decode_attention(b.q[:, :5], *args)
    with pytest.raises(ValueError, match="layer 2 out of range"):
        decode_attention(b.q, b.kv, 2, b.block_tables, b.context_lens)
    with pytest.raises(ValueError, match="window 0 must be"):
        decode_attention(b.q, *args, window=0)
    with pytest.raises(ValueError, match="out: shape"):
        decode_attention(b.q, *args, out=b.q[:1].clone())
    with pytest.raises(ValueError, match="cu_seqlens_q: shape"):
        varlen_attention(b.q, *args, b.cu_seqlens_q[:2])
