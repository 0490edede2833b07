"""Inputs of bench/kernels.py: one LoRA or attention case, with the kernel and baselines.

Torch and triton only. The Triton kernel modules are imported when a case first runs a
kernel (not at import), so bench/kernels.py can switch the interpreter on for --smoke.
LoRA weights live twice: in a page pool read through the row table (the kernels), in
chunks at scattered offsets, and as contiguous per-adapter stacks (the baselines).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.kernels.lora_meta import GROUP_PROJECTIONS, LoraStepMeta

RANK = 16  # every projection's rank in the LoRA cases
PAGE_TOKENS = 16
POPULARITY = ("distinct", "uniform", "skewed", "identical", "base_half")


@dataclass(frozen=True)
class GroupShape:
    group: int  # index in lora_meta.GROUPS
    in_features: int
    outs: tuple[int, ...]  # widths of the group's projections in the fused output


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int


GROUP_SHAPES = {
    "smollm2": {"qkv": GroupShape(0, 576, (576, 192, 192)), "down": GroupShape(3, 1536, (576,))},
    "7b": {"qkv": GroupShape(0, 4096, (4096, 1024, 1024)), "down": GroupShape(3, 14336, (4096,))},
    "tiny": {"qkv": GroupShape(0, 64, (64, 32, 32)), "down": GroupShape(3, 96, (64,))},
}
ATTENTION_SHAPES = {
    "smollm2": AttentionShape(9, 3, 64),
    "7b": AttentionShape(32, 8, 128),
    "tiny": AttentionShape(4, 2, 16),
}


def slots_for(popularity: str, batch: int, gen: torch.Generator) -> tuple[list[int], int]:
    """Adapter slot of each row (−1: base model), and how many adapters there are."""
    if popularity == "distinct":
        return list(range(batch)), batch
    if popularity == "uniform":  # four rows per adapter
        n = math.ceil(batch / 4)
        return [int(i) % n for i in torch.randperm(batch, generator=gen)], n
    if popularity == "skewed":  # Zipf(1.5) over `batch` adapters
        weights = torch.tensor([1 / (k + 1) ** 1.5 for k in range(batch)])
        return torch.multinomial(weights, batch, replacement=True, generator=gen).tolist(), batch
    if popularity == "identical":
        return [0] * batch, 1
    if popularity == "base_half":  # every other row without an adapter
        return [i if i % 2 else -1 for i in range(batch)], batch
    raise ValueError(f"unknown popularity {popularity}")


def paged_meta(
    a: torch.Tensor,  # [n, R, in] the adapters' stacked A
    b: list[torch.Tensor],  # per projection [n, r, w_p]
    shape: GroupShape,
    row_slot: list[int],
    gen: torch.Generator,
) -> LoraStepMeta:
    """Each adapter's rows as one chunk at a scattered offset of a pool twice their size."""
    n, ranks, device = a.shape[0], a.shape[1], a.device
    chunk = math.ceil((a[0].numel() + sum(p[0].numel() for p in b)) / 4096) * 4096
    order = torch.randperm(2 * n, generator=gen)[:n].tolist()
    pool = torch.zeros(2 * n * chunk, dtype=a.dtype, device=device)
    row_addr: list[int] = []
    a_row = torch.full((n, 1, 4), -1, dtype=torch.int64)
    b_row, b_rank = (
        torch.full((n, 1, 7), -1, dtype=torch.int64),
        torch.zeros((n, 1, 7), dtype=torch.int32),
    )
    b_col = torch.zeros((n, 1, 7), dtype=torch.int32)
    for s in range(n):
        at = order[s] * chunk
        a_row[s, 0, shape.group] = len(row_addr)
        for matrix, proj in [(a[s], -1)] + [(p[s], i) for i, p in enumerate(b)]:
            if proj >= 0:
                m = GROUP_PROJECTIONS[shape.group][proj]
                b_row[s, 0, m], b_rank[s, 0, m], b_col[s, 0, m] = len(row_addr), RANK, proj * RANK
            pool[at : at + matrix.numel()] = matrix.flatten()
            row_addr += [at + j * matrix.shape[1] for j in range(matrix.shape[0])]
            at += matrix.numel()
    a_rank = torch.zeros((n, 1, 4), dtype=torch.int32)
    a_rank[:, 0, shape.group] = ranks
    return LoraStepMeta(
        pool=pool, row_addr=torch.tensor(row_addr, device=device), a_row=a_row.to(device),
        a_rank=a_rank.to(device), b_row=b_row.to(device), b_rank=b_rank.to(device),
        b_col=b_col.to(device), **segments(row_slot, device), max_rank=ranks,
    )  # fmt: skip


def segments(row_slot: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """seg_start/seg_slot: runs of equal slots; row_slot: the slots as given."""
    starts, slots = [0], []
    for t, s in enumerate(row_slot):
        if t and s == row_slot[t - 1]:
            continue
        if t:
            starts.append(t)
        slots.append(s)
    starts.append(len(row_slot))

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return {"seg_start": i32(starts), "seg_slot": i32(slots), "row_slot": i32(row_slot)}


@dataclass
class LoraCase:
    shape: GroupShape
    kind: str  # sgmv or bgmv
    meta: LoraStepMeta
    x: torch.Tensor  # [T, in]
    y: torch.Tensor  # [T, Σ outs], accumulated into by every expand run
    v: torch.Tensor  # [T, R] float32, the shrink's output (input of expand-only runs)
    a: torch.Tensor  # [n, R, in] contiguous per-adapter A
    b: list[torch.Tensor]  # per projection [n, r, w_p]
    by_slot: list[tuple[int, torch.Tensor]]  # per adapter in use: (slot, its rows [n_s])
    active: torch.Tensor  # [T'] rows with an adapter
    active_slot: torch.Tensor  # [T'] their slots

    @property
    def out_cols(self) -> list[tuple[int, int]]:
        return [(sum(self.shape.outs[:p]), w) for p, w in enumerate(self.shape.outs)]

    def kernel(self, op: str) -> Callable[[], object]:
        from worker.kernels import bgmv, sgmv

        shrink = sgmv.sgmv_shrink if self.kind == "sgmv" else bgmv.bgmv_shrink
        expand = sgmv.sgmv_expand if self.kind == "sgmv" else bgmv.bgmv_expand
        g, cols = self.shape.group, self.out_cols

        def run_shrink() -> torch.Tensor:
            return shrink(self.x, self.meta, 0, g, row_align=8)

        def run_expand(v: torch.Tensor | None = None) -> None:
            expand(self.y, self.v if v is None else v, self.meta, 0, g, cols, row_align=8)

        return _pick(op, run_shrink, run_expand)

    def loop(self, op: str) -> Callable[[], object]:
        """One torch.matmul per adapter in use (and per projection for the expand)."""

        def shrink() -> torch.Tensor:
            v = torch.zeros_like(self.v)
            for s, rows in self.by_slot:
                v[rows] = torch.matmul(self.x[rows], self.a[s].T).float()
            return v

        def expand(v: torch.Tensor | None = None) -> None:
            v = self.v if v is None else v
            for s, rows in self.by_slot:
                for p, (c, w) in enumerate(self.out_cols):
                    part = v[rows, p * RANK : (p + 1) * RANK].to(self.y.dtype)
                    self.y[rows, c : c + w] += torch.matmul(part, self.b[p][s])

        return _pick(op, shrink, expand)

    def bmm(self, op: str) -> Callable[[], object]:
        """Each row's weights gathered from the stacks, then one torch.bmm per projection."""

        def shrink() -> torch.Tensor:
            v = torch.zeros_like(self.v)
            xa = self.x[self.active, :, None]  # [T', in, 1]
            v[self.active] = torch.bmm(self.a[self.active_slot], xa)[..., 0].float()
            return v

        def expand(v: torch.Tensor | None = None) -> None:
            vd = (self.v if v is None else v)[self.active, None, :].to(self.y.dtype)  # [T', 1, R]
            for p, (c, w) in enumerate(self.out_cols):
                out = torch.bmm(vd[:, :, p * RANK : (p + 1) * RANK], self.b[p][self.active_slot])
                self.y[self.active, c : c + w] += out[:, 0]

        return _pick(op, shrink, expand)

    def bytes(self, op: str) -> int:
        """What the op must move: x or y rows, the adapters in use once, and v."""
        es, used, rows = self.x.element_size(), len(self.by_slot), self.active.numel()
        ranks, outs = self.a.shape[1], sum(self.shape.outs)
        shrink = rows * self.shape.in_features * es + used * ranks * self.shape.in_features * es
        shrink += self.x.shape[0] * ranks * 4
        expand = rows * ranks * 4 + used * RANK * outs * es + 2 * rows * outs * es
        return {"shrink": shrink, "expand": expand, "lora": shrink + expand}[op]

    def verify(self) -> None:
        """The kernels' LoRA equals the matmul loop's on these inputs (bf16-close)."""
        y0 = self.y.clone()
        self.kernel("lora")()
        ours, self.y = self.y, y0.clone()
        self.loop("lora")()
        _close(ours, self.y, f"{self.kind} on {self.shape}")  # the LoRA term is ~20% of y
        self.y = y0


def lora_case(
    shape: GroupShape, kind: str, batch: int, popularity: str, dtype: torch.dtype,
    device: torch.device, seed: int,
) -> LoraCase:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    slots, n = slots_for(popularity, batch, gen)
    if kind == "sgmv":
        slots = sorted(slots)  # tokens sorted into segments by adapter
    ranks = RANK * len(shape.outs)

    def rand(*size: int, scale: float) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(dtype).to(device)

    a = rand(n, ranks, shape.in_features, scale=1 / math.sqrt(shape.in_features))
    b = [rand(n, RANK, w, scale=0.05) for w in shape.outs]
    meta = paged_meta(a, b, shape, slots, gen)
    slot_t = torch.tensor(slots, device=device)
    active = torch.nonzero(slot_t >= 0).flatten()
    by_slot = [(s, torch.nonzero(slot_t == s).flatten()) for s in sorted(set(slots) - {-1})]
    x = rand(batch, shape.in_features, scale=1.0)
    y = rand(batch, sum(shape.outs), scale=1.0)
    v = torch.randn(batch, ranks, generator=gen).to(device)
    return LoraCase(shape, kind, meta, x, y, v, a, b, by_slot, active, slot_t[active])


@dataclass
class AttentionCase:
    mode: str  # decode or varlen
    q: torch.Tensor  # decode [B, H, d]; varlen [B · ctx, H, d]
    kv: torch.Tensor  # [P, 1, 2, PAGE_TOKENS, n_kv, d]
    tables: torch.Tensor  # [B, blocks] int32
    lens: torch.Tensor  # [B] int32
    cu: torch.Tensor  # [B + 1] int32
    ctx: int

    def kernel(self) -> torch.Tensor:
        from worker.kernels import paged_attention as pa

        if self.mode == "decode":
            return pa.decode_attention(self.q, self.kv, 0, self.tables, self.lens)
        return pa.varlen_attention(self.q, self.kv, 0, self.tables, self.lens, self.cu)

    def _queries(self) -> torch.Tensor:  # [B, H, Lq, d]
        batch = self.tables.shape[0]
        return self.q.view(batch, -1, *self.q.shape[1:]).transpose(1, 2)

    def loop(self) -> torch.Tensor:
        """Per sequence: gather its pages, then SDPA."""
        q, outs = self._queries(), []
        for b in range(self.tables.shape[0]):
            k, v = self._gather(self.tables[b : b + 1])
            outs.append(self._sdpa(q[b : b + 1], k, v))
        return torch.cat(outs)

    def batched(self) -> torch.Tensor:
        """Gather every sequence's pages into one padded batch, then one SDPA."""
        k, v = self._gather(self.tables)
        return self._sdpa(self._queries(), k, v)

    def _gather(self, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pages = self.kv[tables.long(), 0]  # [B, blocks, 2, pt, n_kv, d]
        k = pages[:, :, 0].flatten(1, 2)[:, : self.ctx].transpose(1, 2)  # [B, n_kv, ctx, d]
        v = pages[:, :, 1].flatten(1, 2)[:, : self.ctx].transpose(1, 2)
        return k, v

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        causal = self.mode == "varlen"  # prefill: queries are the whole context
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    def bytes(self) -> int:
        es = self.q.element_size()
        kv_bytes = self.tables.shape[0] * self.ctx * 2 * self.kv.shape[4] * self.kv.shape[5] * es
        return kv_bytes + 2 * self.q.numel() * es

    def verify(self) -> None:
        ours = self.kernel()
        ref = self.batched().transpose(1, 2).flatten(0, 1)  # [B · Lq, H, d]
        _close(ours, ref, f"{self.mode} attention")


def attention_case(
    shape: AttentionShape, mode: str, batch: int, ctx: int, dtype: torch.dtype,
    device: torch.device, seed: int,
) -> AttentionCase:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    blocks = math.ceil(ctx / PAGE_TOKENS)
    pages = batch * blocks + 1
    kv = torch.randn(pages, 1, 2, PAGE_TOKENS, shape.kv_heads, shape.head_dim, generator=gen)
    tables = torch.randperm(pages, generator=gen)[: batch * blocks].view(batch, blocks)
    q_len = 1 if mode == "decode" else ctx
    q = torch.randn(batch * q_len, shape.heads, shape.head_dim, generator=gen)
    cu = torch.arange(batch + 1) * q_len
    return AttentionCase(
        mode, q.to(dtype).to(device), kv.to(dtype).to(device), tables.int().to(device),
        torch.full((batch,), ctx, dtype=torch.int32, device=device), cu.int().to(device), ctx,
    )  # fmt: skip


def _pick(
    op: str, shrink: Callable[[], torch.Tensor], expand: Callable[[torch.Tensor | None], None]
) -> Callable[[], object]:
    """The shrink alone, the expand alone (on the case's v), or both in a row."""

    def lora() -> None:
        expand(shrink())

    ops: dict[str, Callable[[], object]] = {
        "shrink": shrink,
        "expand": lambda: expand(None),
        "lora": lora,
    }
    return ops[op]


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = float((ours.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
    if not err < 2e-2:
        raise AssertionError(f"{what}: kernel and baseline differ (relative error {err:.2e})")
