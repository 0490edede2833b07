"""Adapter blobs into the engine, across the tiers: disk cache → host memory → device pages.

- A blob on local disk is registered with the engine under its digest.
- Work that is only *queued* (the broker's ready set, not yet claimed by anyone) starts
  its adapter's blob fetch and host load now, so a cold adapter is usually in host memory
  before its first request is scheduled (prefetch).
- A blob is pinned in the disk cache while a job uses it or a host load reads it; an
  evicted blob is forgotten by the engine.
- Claim affinity: adapters on the device first, then in host memory, then on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from broker.keys import BASE
from worker.blob_cache import AdapterBlobs, AdapterFetchError
from worker.engine import Engine
from worker.lora.manager import Tier

log = logging.getLogger(__name__)


class AdapterFeed:
    def __init__(self, engine: Engine, blobs: AdapterBlobs, prefetch_limit: int = 16) -> None:
        self.engine = engine
        self.blobs = blobs
        self.prefetch_limit = prefetch_limit  # queued adapters looked at per pass
        self.held: set[str] = set()  # digests registered with the engine (blob on disk)

    def ready(self, digest: str) -> bool:
        """True once the blob is local and registered; the cache fetches in the background."""
        if not digest:
            return True
        path = self.blobs.get(digest)  # None while the blob is on its way
        if path is None:
            return False
        if digest not in self.held:
            try:
                self.engine.register_adapter(digest, path)
            except ValueError as exc:
                raise AdapterFetchError(f"adapter {digest[:12]} cannot be loaded: {exc}") from exc
            self.held.add(digest)
        return True

    def prefetch(self, queued: Iterable[str]) -> int:
        """Start fetching and host-loading the adapters of queued work; how many were started."""
        started = 0
        for digest in list(queued)[: self.prefetch_limit]:
            if digest == BASE or self._tier(digest) in (Tier.DEVICE, Tier.HOST, Tier.LOADING):
                continue
            try:
                if self.ready(digest):
                    self.engine.prefetch_adapter(digest)
                    started += 1
            except AdapterFetchError as exc:  # its jobs get the error when they are claimed
                log.debug("prefetch of %s failed: %s", digest[:12], exc)
        return started

    def affinity(self) -> tuple[set[str], set[str], set[str]]:
        """(on the device, in host memory, on disk): the claim preference, best first."""
        tiers = {d: self._tier(d) for d in self.held}
        device = {d for d, t in tiers.items() if t is Tier.DEVICE} | {BASE}
        host = {d for d, t in tiers.items() if t in (Tier.HOST, Tier.LOADING)}
        return device, host, self.held - device - host

    def trim(self, in_use: set[str]) -> set[str]:
        """Keep the disk cache in budget; never evict a blob in use or being read."""
        reading = {d for d in self.held if self._tier(d) is Tier.LOADING}
        evicted = self.blobs.trim(in_use | reading)
        for digest in evicted & self.held:
            self.engine.forget_adapter(digest)
        self.held -= evicted
        return evicted

    def _tier(self, digest: str) -> Tier:
        return self.engine.adapter_tier(digest) if digest in self.held else Tier.ABSENT
