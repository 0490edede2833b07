"""Compile every Triton kernel for a GPU without one: Triton's own compiler and the ptxas it
ships, ahead of time, for the tiles the CUDA branches of the wrappers choose.

    python -m bench.kernel_compile [--arch 90] [--out FILE]

Triton's interpreter (how `make test` runs the kernels on the CPU) never compiles: a tile
that needs more shared memory than the GPU has, a `tl.dot` shape the tensor cores refuse,
or code the code generator rejects only shows on the first GPU run. This compiles each
kernel for sm_90 (H100) in bfloat16 and float32 at the tile choices of `sgmv_tiles`,
`bgmv_tiles` and the attention wrappers (SM count fixed at an H100's 132) for SmolLM2's
and a 7B model's shapes, and reports each variant's shared memory, registers and spills
(read with the cuobjdump Triton ships, where it is there). Run it without TRITON_INTERPRET
(the kernels must be JIT functions, not interpreted ones); the test runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SHAPES = {  # hidden, q heads, kv heads, head dim, intermediate: SmolLM2-135M and a 7B
    "smollm2": (576, 9, 3, 64, 1536),
    "7b": (4096, 32, 8, 128, 14336),
}
SMEM_LIMIT = 227 * 1024  # H100: the most shared memory one block may ask for
SMS = 132  # H100 SXM


def variants() -> Iterator[tuple[str, Any, dict[str, str], dict[str, Any]]]:
    """(name, kernel, pointer and float argument types, constexprs and the launch's
    num_warps where the wrapper sets one) for every distinct variant."""
    seen: set[tuple[str, str]] = set()
    for name, kernel, ptrs, consts in _candidates():
        key = (name, json.dumps(consts, sort_keys=True))
        if key not in seen:
            seen.add(key)
            yield name, kernel, ptrs, consts


def _candidates() -> Iterator[tuple[str, Any, dict[str, str], dict[str, Any]]]:
    """What the wrappers' CUDA branches launch for these shapes (repeats included)."""
    from worker.kernels import bgmv, paged_attention, sgmv
    from worker.kernels.triton_util import pow2_at_least

    cuda = torch.device("cuda")
    for dt in ("bf16", "fp32"):
        native = dt == "bf16"
        a, b = _lora_ptrs(dt, "a"), _lora_ptrs(dt, "b")
        for hidden, heads, kv_heads, head_dim, inter in SHAPES.values():
            widths = (hidden, heads * head_dim, inter)
            for tokens, segments in ((8, 1), (1344, 32), (2048, 4), (64, 64)):
                seg = pow2_at_least(segments, 2)
                for width, rank in itertools.product(widths, (8, 64, 256)):
                    t = sgmv.sgmv_tiles(tokens, segments, width, rank, cuda)
                    tile = dict(BLOCK_M=t.block_m, BLOCK_R=t.block_r, SEG_BLOCK=seg, ROW_ALIGN=16)
                    yield (
                        f"sgmv_shrink {dt}",
                        sgmv._shrink_kernel,
                        a,
                        dict(tile, BLOCK_K=t.block_k, SPLIT_K=t.split_k, NATIVE=native),
                    )
                    yield (
                        f"sgmv_expand {dt}",
                        sgmv._expand_kernel,
                        b,
                        dict(tile, BLOCK_N=t.block_n, NATIVE=native, num_warps=t.expand_warps),
                    )
            ba, bb = _lora_ptrs(dt, "a", bgmv=True), _lora_ptrs(dt, "b", bgmv=True)
            for tokens, width, rank, align in itertools.product(
                (1, 8, 32, 64), widths, (16, 64, 256), (16, 1)
            ):
                t2 = bgmv.bgmv_tiles(tokens, width, rank, cuda)
                yield (
                    f"bgmv_shrink {dt}",
                    bgmv._shrink_kernel,
                    ba,
                    dict(
                        BLOCK_R=t2.block_r, BLOCK_K=t2.block_k, SPLIT_K=t2.split_k, ROW_ALIGN=align
                    ),
                )
                yield (
                    f"bgmv_expand {dt}",
                    bgmv._expand_kernel,
                    bb,
                    dict(BLOCK_R=t2.block_r, BLOCK_N=t2.block_n, ROW_ALIGN=align),
                )
            d, group = pow2_at_least(head_dim, 16), heads // kv_heads
            warps = paged_attention.attention_warps(head_dim)
            attention = {"q_ptr": f"*{dt}", "kv_ptr": f"*{dt}", "tables_ptr": "*i32",
                         "lens_ptr": "*i32", "qk_scale": "fp32"}  # fmt: skip
            for store in (True, False):  # split (float32 partials) or one split (the output)
                out = "*fp32" if store else f"*{dt}"
                yield f"decode_attention {dt}", paged_attention._decode_kernel, dict(
                    attention, o_ptr=out, lse_ptr=out
                ), dict(HEAD_DIM=head_dim, BLOCK_D=d, BLOCK_H=pow2_at_least(group, 16),
                        BLOCK_N=64, STORE_LSE=store, NATIVE=native, num_warps=warps)  # fmt: skip
            for splits in (2, 64):
                ptrs = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": f"*{dt}"}
                yield (
                    f"combine {dt}",
                    paged_attention._combine_kernel,
                    ptrs,
                    dict(HEAD_DIM=head_dim, BLOCK_D=d, SPLIT_BLOCK=pow2_at_least(splits, 2)),
                )
            for bm in (16, 64):  # varlen_attention's two row tiles
                yield f"varlen_attention {dt}", paged_attention._varlen_kernel, dict(
                    attention, cu_ptr="*i32", o_ptr=f"*{dt}"
                ), dict(HEAD_DIM=head_dim, BLOCK_D=d, BLOCK_M=bm, BLOCK_N=64, SEQ_BLOCK=32,
                        NATIVE=native, num_warps=warps)  # fmt: skip


def _lora_ptrs(dt: str, side: str, bgmv: bool = False) -> dict[str, str]:
    ptrs = {"v_ptr": "*fp32", "pool_ptr": f"*{dt}", "row_addr_ptr": "*i64"}
    ptrs.update({"x_ptr": f"*{dt}"} if side == "a" else {"y_ptr": f"*{dt}", "b_col_ptr": "*i32"})
    ptrs.update({f"{side}_row_ptr": "*i64", f"{side}_rank_ptr": "*i32"})
    ptrs.update(
        {"row_slot_ptr": "*i32"} if bgmv else {"seg_start_ptr": "*i32", "seg_slot_ptr": "*i32"}
    )
    return ptrs


def compile_one(
    kernel: Any, ptrs: dict[str, str], consts: dict[str, Any], arch: int
) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(consts)
    options = {"num_warps": consts.pop("num_warps", 4)}  # a launch option, not a constexpr
    signature = {
        name: "constexpr" if name in consts else ptrs.get(name, "i32") for name in kernel.arg_names
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    row: dict[str, Any] = {"shared_bytes": compiled.metadata.shared}
    row.update(_resources(compiled.asm.get("cubin")))
    return row


def _resources(cubin: bytes | None) -> dict[str, int]:
    """Registers and stack (spills) per thread, from the cuobjdump Triton ships, if any."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cubin is None or not tool.is_file():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    found = {k: re.search(rf"{k}:(\d+)", text) for k in ("REG", "STACK")}
    return {k.lower(): int(m.group(1)) for k, m in found.items() if m}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability × 10 (default 90)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    from worker.kernels import bgmv, sgmv

    bgmv.sm_count = sgmv.sm_count = lambda device: SMS  # type: ignore[assignment]
    rows = []
    for name, kernel, ptrs, consts in variants():
        row: dict[str, Any] = {"kernel": name, "consts": consts}
        try:
            row.update(compile_one(kernel, ptrs, consts, args.arch))
            row["ok"] = row["shared_bytes"] <= SMEM_LIMIT
        except Exception as exc:  # noqa: BLE001 (report every variant, then fail)
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:500]}")
        rows.append(row)
        sys.stdout.write(f"{'ok  ' if row['ok'] else 'FAIL'} {name} {consts} "
                         f"{ {k: v for k, v in row.items() if k not in ('kernel', 'consts', 'ok')} }\n")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"arch": args.arch, "rows": rows}, indent=1) + "\n")
    failed = sum(not r["ok"] for r in rows)
    sys.stdout.write(f"{len(rows) - failed} of {len(rows)} variants compiled for sm_{args.arch}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
