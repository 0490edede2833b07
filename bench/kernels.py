"""Kernel benchmark: Triton SGMV, BGMV and paged attention against torch baselines.

On a GPU host, from the repository root (needs torch and triton only):

    python -m bench.kernels            # writes bench/results/kernels.json
    python -m bench.kernels --quick    # batches 1 and 64, two popularity modes
    python -m bench.kernels --smoke    # tiny shapes; on a CPU through the interpreter;
                                       # prints, writes nothing unless --out is given

Per kernel and case: the median time (triton.testing.do_bench: CUDA events, warmed up, L2
flushed before each run, and inputs rotated over several independent buffers), the bytes
it must move and the bandwidth achieved as a fraction of a device-to-device copy measured
in the same run, and its speed against two baselines on contiguous per-adapter weights:
a per-adapter torch.matmul loop, and gather + torch.bmm (attention: per-sequence SDPA,
and gather into a padded batch + SDPA). LoRA cases use rank 16 on every projection, the
qkv group (three outputs in one expand) and the down group (input = the MLP width), batch
1..64 rows (SGMV: one-token segments sorted by adapter, as in Punica; BGMV: rows in
arrival order) × adapter popularity. Targets (docs: issue 9): BGMV at batch 64 with
distinct adapters ≥ 70% of the copy bandwidth; SGMV distinct at batch 64 ≤ 3× its
batch-1 time; every kernel faster than both baselines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.kernel_cases import (
    ATTENTION_SHAPES,
    GROUP_SHAPES,
    POPULARITY,
    attention_case,
    lora_case,
)

RESULTS = Path(__file__).parent / "results" / "kernels.json"
Timer = Callable[[Callable[[], object]], float]  # fn → median milliseconds


def make_timer(device: torch.device) -> Timer:
    if device.type == "cuda":
        import triton.testing

        def cuda_ms(fn: Callable[[], object]) -> float:
            return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))

        return cuda_ms

    def cpu_ms(fn: Callable[[], object]) -> float:  # smoke runs only: not a measurement
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return cpu_ms


def rotating(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One call per input set in turn, so repeated runs do not find their inputs in cache."""
    state = {"i": 0}

    def call() -> object:
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return call


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def lora_rows(
    shape: str, group: str, kind: str, batch: int, popularity: str, args: argparse.Namespace,
    timer: Timer, copy_bps: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """Shrink, expand and the two together for one case, each against both baselines."""
    cases = [
        lora_case(
            GROUP_SHAPES[shape][group], kind, batch, popularity, args.dtype, args.device, seed
        )
        for seed in range(args.rotate)
    ]
    cases[0].verify()
    rows = []
    for op in ("shrink", "expand", "lora"):
        ms = timer(rotating([c.kernel(op) for c in cases]))
        ms_loop = timer(rotating([c.loop(op) for c in cases]))
        ms_bmm = timer(rotating([c.bmm(op) for c in cases]))
        nbytes = cases[0].bytes(op)
        rows.append({
            "kernel": f"{kind}_{op}", "shape": shape, "group": group, "batch": batch,
            "popularity": popularity, "ms": ms, "bytes": nbytes,
            "GBps": nbytes / (ms * 1e-3) / 1e9, "frac_of_copy": nbytes / (ms * 1e-3) / copy_bps,
            "ms_matmul_loop": ms_loop, "ms_gather_bmm": ms_bmm,
            "speedup_vs_matmul_loop": ms_loop / ms, "speedup_vs_gather_bmm": ms_bmm / ms,
        })  # fmt: skip
    return rows


def attention_rows(
    shape: str, mode: str, batch: int, ctx: int, args: argparse.Namespace, timer: Timer,
    copy_bps: float,
) -> list[dict[str, Any]]:  # fmt: skip
    cases = [
        attention_case(ATTENTION_SHAPES[shape], mode, batch, ctx, args.dtype, args.device, seed)
        for seed in range(args.rotate)
    ]
    cases[0].verify()
    ms = timer(rotating([c.kernel for c in cases]))
    ms_loop = timer(rotating([c.loop for c in cases]))
    ms_batched = timer(rotating([c.batched for c in cases]))
    nbytes = cases[0].bytes()
    return [{
        "kernel": f"{mode}_attention", "shape": shape, "batch": batch, "context": ctx,
        "ms": ms, "bytes": nbytes, "GBps": nbytes / (ms * 1e-3) / 1e9,
        "frac_of_copy": nbytes / (ms * 1e-3) / copy_bps,
        "ms_sdpa_loop": ms_loop, "ms_gather_sdpa": ms_batched,
        "speedup_vs_sdpa_loop": ms_loop / ms, "speedup_vs_gather_sdpa": ms_batched / ms,
    }]  # fmt: skip


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, each with the rows it was judged on."""

    def pick(kernel: str, batch: int, popularity: str = "distinct") -> list[dict[str, Any]]:
        return [
            r for r in rows
            if r["kernel"] == kernel and r["batch"] == batch and r.get("popularity") == popularity
        ]  # fmt: skip

    bgmv = [
        {"shape": r["shape"], "group": r["group"], "frac_of_copy": r["frac_of_copy"]}
        for r in pick("bgmv_lora", 64)
    ]
    sgmv = []
    for r64 in pick("sgmv_lora", 64):
        r1 = [
            r
            for r in pick("sgmv_lora", 1)
            if (r["shape"], r["group"]) == (r64["shape"], r64["group"])
        ]
        if r1:
            ratio = r64["ms"] / r1[0]["ms"]
            sgmv.append({"shape": r64["shape"], "group": r64["group"], "b64_over_b1": ratio})
    losers = [
        {k: r.get(k) for k in ("kernel", "shape", "group", "batch", "popularity", "context")}
        for r in rows
        if min(v for k, v in r.items() if k.startswith("speedup_vs")) <= 1.0
    ]
    return {
        "bgmv_b64_distinct_frac_of_copy_ge_0.7": {
            "met": all(x["frac_of_copy"] >= 0.7 for x in bgmv) if bgmv else None, "cases": bgmv,
        },
        "sgmv_b64_over_b1_distinct_le_3": {
            "met": all(x["b64_over_b1"] <= 3 for x in sgmv) if sgmv else None, "cases": sgmv,
        },
        "every_kernel_beats_both_baselines": {"met": not losers, "not_faster": losers},
    }  # fmt: skip


def environment(device: torch.device) -> dict[str, Any]:
    import triton

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    timer = make_timer(args.device)
    copy_bps = copy_bandwidth(args.device, timer, args.copy_bytes)
    rows: list[dict[str, Any]] = []
    for shape in args.shapes:
        for group in GROUP_SHAPES[shape]:
            for kind in ("sgmv", "bgmv"):
                for batch in args.batches:
                    for popularity in args.popularity:
                        rows += lora_rows(
                            shape, group, kind, batch, popularity, args, timer, copy_bps
                        )
            save(args, kernel_report(args, copy_bps, rows, partial=True))
        for mode, ctx in (
            ("decode", args.contexts[0]),
            ("decode", args.contexts[1]),
            ("varlen", args.contexts[0]),
        ):
            for batch in args.batches:
                rows += attention_rows(shape, mode, batch, ctx, args, timer, copy_bps)
        save(args, kernel_report(args, copy_bps, rows, partial=True))
    return kernel_report(args, copy_bps, rows, partial=False)


def kernel_report(
    args: argparse.Namespace, copy_bps: float, rows: list[dict[str, Any]], partial: bool
) -> dict[str, Any]:
    return {
        "env": environment(args.device),
        "smoke": args.smoke,  # tiny shapes on whatever device: timings mean nothing
        "partial": partial,  # written after each group: a run cut off keeps what it measured
        "dtype": str(args.dtype),
        "copy_GBps": copy_bps / 1e9,
        "rows": rows,
        "targets": targets(rows),
    }


def save(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="batches 1 and 64; distinct and identical")
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes, runs on a CPU; writes nothing"
    )
    p.add_argument("--out", type=Path, help=f"JSON path (default {RESULTS}; none with --smoke)")
    args = p.parse_args(argv)
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = torch.bfloat16
    args.shapes, args.rotate, args.copy_bytes = ("smollm2", "7b"), 4, 1 << 30
    args.batches, args.popularity, args.contexts = (1, 4, 16, 64), POPULARITY, (512, 4096)
    if args.quick:
        args.batches, args.popularity = (1, 64), ("distinct", "identical")
    if args.smoke:
        args.shapes, args.rotate, args.copy_bytes = ("tiny",), 2, 1 << 20
        args.batches, args.popularity, args.contexts = (4,), ("base_half",), (16, 40)
    elif args.device.type != "cuda":
        p.error("no CUDA device: only --smoke runs here (through Triton's interpreter)")
    if args.out is None and not args.smoke:
        args.out = RESULTS
    return args


def main(argv: list[str] | None = None) -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    args = parse(argv)
    result = run(args)
    for name, target in result["targets"].items():
        print(f"{name}: {({True: 'met', False: 'NOT met', None: 'not judged'})[target['met']]}")
    print(
        f"{len(result['rows'])} rows; copy {result['copy_GBps']:.0f} GB/s on {result['env']['device']}"
    )
    save(args, result)
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
