"""Where an adapter's rows go in its pages (pure Python; docs/memory.md).

An adapter is a stream of matrices, layer-major, groups in layer order: per group the
stacked A of its targeted projections [Σ r_m, in_g], then each targeted projection's
B [r_m, out_m]. Rows fill the adapter's pages in order; a row runs across a page
boundary only into the physically adjacent page, else it starts at the next page.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from worker.kernels.lora_meta import GROUP_PROJECTIONS, PROJECTIONS


@dataclass(frozen=True)
class MatrixSpec:
    layer: int
    group: int  # index in lora_meta.GROUPS
    proj: int  # index in lora_meta.PROJECTIONS for a B; -1 for the group's stacked A
    rows: int
    width: int
    rank_col: int = 0  # B only: first column of the group's shrink output it reads


class DoesNotFit(Exception):
    """The pages given cannot hold the rows (scattered pages lose room at boundaries)."""


def matrix_specs(
    ranks: Mapping[tuple[int, int], int],  # (layer, projection index) -> r
    in_widths: tuple[int, ...],  # per group: input width
    out_widths: tuple[int, ...],  # per projection: output width
    num_layers: int,
) -> list[MatrixSpec]:
    specs: list[MatrixSpec] = []
    for layer in range(num_layers):
        for group, projs in enumerate(GROUP_PROJECTIONS):
            targeted = [p for p in projs if (layer, p) in ranks]
            if not targeted:
                continue
            total = sum(ranks[(layer, p)] for p in targeted)
            specs.append(MatrixSpec(layer, group, -1, total, in_widths[group]))
            col = 0
            for p in targeted:
                r = ranks[(layer, p)]
                specs.append(MatrixSpec(layer, group, p, r, out_widths[p], col))
                col += r
    return specs


def total_elems(specs: list[MatrixSpec]) -> int:
    return sum(s.rows * s.width for s in specs)


def place_rows(specs: list[MatrixSpec], pages: list[int], page_elems: int) -> list[int]:
    """The flat element offset of every row, matrix by matrix, or DoesNotFit."""
    widest = max((spec.width for spec in specs), default=0)
    if widest > page_elems:
        raise ValueError(f"a row of {widest} elements is wider than a page")
    if pages and pages == list(range(pages[0], pages[0] + len(pages))):
        return _back_to_back(specs, pages[0] * page_elems, len(pages) * page_elems)
    addresses: list[int] = []
    index, offset = 0, 0  # position in pages[index], elements used of it
    for spec in specs:
        for _ in range(spec.rows):
            if offset + spec.width > page_elems:
                adjacent = index + 1 < len(pages) and pages[index + 1] == pages[index] + 1
                if not adjacent or offset == page_elems:
                    index, offset = index + 1, 0
            if index >= len(pages):
                raise DoesNotFit(f"{len(pages)} pages cannot hold the adapter's rows")
            addresses.append(pages[index] * page_elems + offset)
            offset += spec.width
            if offset >= page_elems:  # ran into the adjacent page
                index, offset = index + 1, offset - page_elems
    return addresses


def _back_to_back(specs: list[MatrixSpec], start: int, room: int) -> list[int]:
    """One run of adjacent pages: rows back to back (what place_rows' walk gives there)."""
    if total_elems(specs) > room:
        raise DoesNotFit(f"{room} elements cannot hold the adapter's rows")
    addresses: list[int] = []
    for spec in specs:
        addresses.extend(range(start, start + spec.rows * spec.width, spec.width))
        start += spec.rows * spec.width
    return addresses


def projection_index(name: str) -> int:
    return PROJECTIONS.index(name)
