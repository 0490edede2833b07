"""A draft model's KV cache in the target's page pool: same pages, longer blocks.

A page holds E = L · 2 · page_tokens · kv_size elements: one KV block of the target. A
draft model with L_d layers and kv_d = n_kv_d · head_dim_d needs 2 · L_d · kv_d elements
per token, so one page holds

    t_d = E / (2 · L_d · kv_d)  tokens of draft K/V (every draft layer)

and the draft's block is one whole page of t_d tokens: the draft's block tables hold
ordinary page ids from the same allocator (kind KV, owner "<request id>/draft"), its KV
view is the same buffer seen as rows of kv_d, and nothing is allocated beside the pool.
Whole pages rather than slots of a page shared between sequences: a sequence's draft
cache is freed page by page on rollback and release, and no page is pinned by another
sequence's leftovers. The price is at most one partly used page per sequence, the same
tail slack as the target's own cache (docs/memory.md works it out for SmolLM2 drafts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.memory.geometry import PageGeometry


@dataclass(frozen=True)
class DraftGeometry:
    num_layers: int  # L_d
    kv_size: int  # kv_d = n_kv_d · head_dim_d
    block_tokens: int  # t_d: draft tokens per page

    @classmethod
    def fit(cls, page: PageGeometry, num_layers: int, kv_size: int) -> DraftGeometry:
        """The draft block that fills a page exactly, or ValueError naming the mismatch."""
        per_token = 2 * num_layers * kv_size
        if per_token > page.page_elems or page.page_elems % per_token:
            raise ValueError(
                f"a draft with {num_layers} layers of KV width {kv_size} needs {per_token} "
                f"elements per token, which does not divide a page of {page.page_elems} "
                "(pick a draft whose layers x KV width divide the target's, or another "
                "page_size)"
            )
        return cls(num_layers, kv_size, page.page_elems // per_token)

    def kv_rows(self, buffer: torch.Tensor) -> torch.Tensor:
        """The pool's buffer [pages, E] as the draft's KV rows [pages · E / kv_d, kv_d]."""
        return buffer.view(-1, self.kv_size)
