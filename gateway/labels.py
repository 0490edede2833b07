"""Adapter label values for metrics, with bounded cardinality.

Each request is labelled by the adapter it used, as `name:version` (the base model:
`base`). Only the `top_n` adapters with the most recent traffic get their own label; the
rest share `other`. Counts decay (halve every `decay_every` requests), so "top" follows
current traffic and the table of counts stays small.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

BASE = "base"
OTHER = "other"
UNRESOLVED = "unresolved"  # a request that failed before its adapter was resolved


def adapter_label(name: str, version: int) -> str:
    """The label value of an adapter: `name:version`, or `base` for the base model."""
    return f"{name}:{version}" if name else BASE


class AdapterLabels:
    """Maps adapter labels to metric label values: itself while in the top N, else `other`.

    An adapter enters the top N when there is room, or when its count is more than twice
    the weakest member's (hysteresis: two adapters of equal traffic do not swap places on
    every request). `on_evict` is called with a label that left the top N, so its series
    can be removed.
    """

    def __init__(
        self, top_n: int, on_evict: Callable[[str], None], decay_every: int = 10_000
    ) -> None:
        if top_n < 0:
            raise ValueError("top_n must be >= 0")
        self._top_n = top_n
        self._on_evict = on_evict
        self._decay_every = decay_every
        self._counts: Counter[str] = Counter()
        self._seen = 0
        self.top: set[str] = set()

    def label(self, adapter: str) -> str:
        """Count one request for `adapter`; return the label value to use for it."""
        if adapter == BASE:
            return BASE  # always its own series, never counted against the cap
        self._count(adapter)
        if adapter in self.top:
            return adapter
        if len(self.top) < self._top_n:
            self.top.add(adapter)
            return adapter
        if not self.top:
            return OTHER
        weakest = min(self.top, key=lambda a: (self._counts[a], a))
        if self._counts[adapter] <= 2 * self._counts[weakest]:
            return OTHER
        self.top.discard(weakest)
        self._on_evict(weakest)
        self.top.add(adapter)
        return adapter

    def _count(self, adapter: str) -> None:
        self._counts[adapter] += 1
        self._seen += 1
        if self._seen < self._decay_every:
            return
        self._seen = 0
        for key in list(self._counts):
            self._counts[key] //= 2
            if self._counts[key] == 0 and key not in self.top:
                del self._counts[key]
