"""Job queues: enqueue with bounded depth (gateway), claim / ack / reclaim (workers).

Every adapter has its own stream read through one consumer group. `lp:ready` lists the
adapters that have undelivered jobs, scored by the oldest one's enqueue time, so a worker
finds work without scanning and can prefer adapters it holds without starving anyone.
A job stays in its stream (pending) until acked after its terminal event; a dead worker's
pending jobs are claimed by a live one, and a job delivered too often is dead-lettered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from google.protobuf.message import DecodeError

from broker import keys
from protos.lorapool.v1 import queue_pb2

# KEYS: queue, ready, streams, total, meta. ARGV: payload, adapter, max per adapter,
# max total, meta ttl ms. The meta hash starts with `seen` = Redis time (the reader is live). Returns {status, entry id}: 0 ok, -1 adapter full, -2 total full,
# -3 duplicate request id.
_ENQUEUE = """
if redis.call('EXISTS', KEYS[5]) == 1 then return {-3, ''} end
if tonumber(redis.call('GET', KEYS[4]) or '0') >= tonumber(ARGV[4]) then return {-2, ''} end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[3]) then return {-1, ''} end
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], 'workers', '0', 'MKSTREAM')
local id = redis.call('XADD', KEYS[1], '*', 'job', ARGV[1])
redis.call('ZADD', KEYS[2], 'NX', tonumber(string.match(id, '^(%d+)')), ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('INCR', KEYS[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[5], 'attempt', 0, 'sent', 0, 'seen', now)
redis.call('PEXPIRE', KEYS[5], ARGV[5])
return {0, id}
"""

# KEYS: queue, ready. ARGV: consumer, count, adapter. Delivers up to `count` new jobs and
# re-scores the adapter in `lp:ready` by its next undelivered job (or removes it).
_CLAIM = """
local ok, res = pcall(redis.call, 'XREADGROUP', 'GROUP', 'workers', ARGV[1],
                      'COUNT', ARGV[2], 'STREAMS', KEYS[1], '>')
if not ok or not res then redis.call('ZREM', KEYS[2], ARGV[3]) return {} end
local entries = res[1][2]
local out = {}
for _, e in ipairs(entries) do
  table.insert(out, e[1])
  table.insert(out, e[2][2])
end
local nxt = redis.call('XRANGE', KEYS[1], '(' .. entries[#entries][1], '+', 'COUNT', 1)
if #nxt == 0 then
  redis.call('ZREM', KEYS[2], ARGV[3])
else
  redis.call('ZADD', KEYS[2], tonumber(string.match(nxt[1][1], '^(%d+)')), ARGV[3])
end
return out
"""

# KEYS: queue, total. ARGV: entry id. Idempotent: the counter drops only if the entry existed.
_ACK = """
redis.call('XACK', KEYS[1], 'workers', ARGV[1])
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  if tonumber(redis.call('DECR', KEYS[2])) < 0 then redis.call('SET', KEYS[2], 0) end
end
return 0
"""

# KEYS: queue, streams, ready. ARGV: adapter. Drops an empty queue (enqueue recreates it).
_DROP_EMPTY = """
if redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
return 0
"""

# KEYS: meta. Sets the cancel flag of a request that still exists.
_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cancel', 1)
return 1
"""

# KEYS: workers set. ARGV: heartbeat key prefix. How many registered workers heartbeat.
_LIVE_WORKERS = """
local n = 0
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  n = n + redis.call('EXISTS', ARGV[1] .. w)
end
return n
"""

TAKEOVER_GUARD_MS = 500


class QueueFull(Exception):
    """The adapter's queue or the total is at its bound."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"queue full ({scope})")
        self.scope = scope


class DuplicateRequest(Exception):
    """A request with this id is still known to the queue."""


@dataclass(frozen=True)
class Claimed:
    """A job delivered to this worker."""

    entry_id: str
    adapter: str
    job: queue_pb2.Job
    deliveries: int  # how many times the job has been delivered, this one included


# Adapters a worker prefers, best first: e.g. (on the device, in host memory, on disk).
Affinity = set[str] | tuple[set[str], ...]


def choose_adapter(
    ready: list[tuple[str, float]], held: Affinity, now_ms: float, max_wait_ms: float
) -> str | None:
    """Pick the adapter to claim from: the oldest if it waited too long, else the oldest
    ready one in the first tier of `held` that has one, else the oldest."""
    if not ready:
        return None
    oldest, score = ready[0]
    if now_ms - score >= max_wait_ms:
        return oldest
    for tier in (held,) if isinstance(held, set) else held:
        found = next((adapter for adapter, _ in ready if adapter in tier), None)
        if found is not None:
            return found
    return oldest


class Producer:
    """The gateway's side: enqueue, cancel, and look at depths (redis.asyncio)."""

    def __init__(self, client: aioredis.Redis, limits: keys.Limits) -> None:
        self._client = client
        self._limits = limits
        self._enqueue = client.register_script(_ENQUEUE)
        self._cancel = client.register_script(_CANCEL)
        self._live_workers = client.register_script(_LIVE_WORKERS)

    async def enqueue(self, job: queue_pb2.Job, now_ms: int) -> str:
        adapter = keys.adapter_key(job.adapter_digest)
        ttl_ms = max(job.deadline_ms - now_ms, 0) + self._limits.result_ttl_s * 1000
        status, entry = await self._enqueue(
            keys=[
                keys.queue(adapter),
                keys.READY,
                keys.STREAMS,
                keys.TOTAL,
                keys.meta(job.request_id),
            ],
            args=[
                keys.encode_job(job),
                adapter,
                self._limits.max_depth_per_adapter,
                self._limits.max_depth_total,
                ttl_ms,
            ],
        )
        if status == -3:
            raise DuplicateRequest(f"request id {job.request_id!r} is already in use")
        if status in (-1, -2):
            raise QueueFull("adapter" if status == -1 else "total")
        return _text(entry)

    async def cancel(self, request_id: str) -> bool:
        return bool(await self._cancel(keys=[keys.meta(request_id)]))

    async def live_workers(self) -> int:
        """Workers whose heartbeat is live, counted in one round trip."""
        return int(await self._live_workers(keys=[keys.WORKERS], args=[keys.heartbeat("")]))

    async def exists(self, request_id: str) -> bool:
        return bool(await self._client.exists(keys.meta(request_id)))

    async def depths(self) -> dict[str, int]:
        """Jobs queued or running per adapter key."""
        adapters = sorted(_text(a) for a in await self._client.smembers(keys.STREAMS))
        async with self._client.pipeline(transaction=False) as pipe:
            for adapter in adapters:
                pipe.xlen(keys.queue(adapter))
            lengths = await pipe.execute()
        return dict(zip(adapters, (int(n) for n in lengths), strict=True))


class Consumer:
    """A worker's side: claim, ack, heartbeat, reclaim from dead workers (sync redis)."""

    def __init__(self, client: redis.Redis, worker: str, limits: keys.Limits) -> None:
        self._client = client
        self.worker = worker
        self.limits = limits
        self._claim = client.register_script(_CLAIM)
        self._ack = client.register_script(_ACK)
        self._drop_empty = client.register_script(_DROP_EMPTY)

    def heartbeat(self) -> None:
        ttl_ms = int(self.limits.heartbeat_ttl_s * 1000)
        pipe = self._client.pipeline(transaction=False)
        pipe.set(keys.heartbeat(self.worker), b"1", px=ttl_ms)
        pipe.sadd(keys.WORKERS, self.worker)
        pipe.execute()

    def retire(self) -> None:
        self._client.delete(keys.heartbeat(self.worker))

    def dead_workers(self) -> list[str]:
        """Registered workers whose heartbeat expired (one round trip for the whole fleet)."""
        workers = sorted(_text(w) for w in self._client.smembers(keys.WORKERS))
        pipe = self._client.pipeline(transaction=False)
        for worker in workers:
            pipe.exists(keys.heartbeat(worker))
        return [
            w
            for w, alive in zip(workers, pipe.execute(), strict=True)
            if not alive and w != self.worker
        ]

    def ready(self, limit: int = 32) -> list[tuple[str, float]]:
        pairs: Any = self._client.zrange(keys.READY, 0, limit - 1, withscores=True)
        return [(_text(a), float(s)) for a, s in pairs]

    def claim(self, held: Affinity, count: int, max_wait_ms: float) -> list[Claimed]:
        """Claim up to `count` new jobs from one adapter chosen by `choose_adapter`."""
        adapter = choose_adapter(self.ready(), held, time.time() * 1000, max_wait_ms)
        if adapter is None or count < 1:
            return []
        flat = self._claim(
            keys=[keys.queue(adapter), keys.READY], args=[self.worker, count, adapter]
        )
        pairs = [(_text(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]
        return self._decoded(adapter, pairs, {})

    def ack(self, claimed: Claimed) -> None:
        self._ack(keys=[keys.queue(claimed.adapter), keys.TOTAL], args=[claimed.entry_id])

    def reclaim(self, full: bool = False) -> list[Claimed]:
        """Take over the pending jobs of workers whose heartbeat expired; tidy empty queues.

        Cheap unless a registered worker died: the queues are scanned only then, or when
        `full` (a periodic sweep that also catches consumers that never registered).
        """
        dead = self.dead_workers()
        if not dead and not full:
            return []
        out: list[Claimed] = []
        unfinished: set[str] = set()  # dead workers that still own pending jobs
        for adapter in sorted(_text(a) for a in self._client.smembers(keys.STREAMS)):
            stream = keys.queue(adapter)
            try:
                consumers = self._client.xinfo_consumers(stream, keys.GROUP)
            except redis.ResponseError:  # no such stream or group
                consumers = []
            for consumer in consumers:
                taken = self._take_over(adapter, consumer)
                if len(taken) < int(consumer["pending"]):
                    unfinished.add(_text(consumer["name"]))
                out.extend(taken)
            self._drop_empty(keys=[stream, keys.STREAMS, keys.READY], args=[adapter])
        if set(dead) - unfinished:
            self._client.srem(keys.WORKERS, *(set(dead) - unfinished))
        return out

    def _take_over(self, adapter: str, consumer: dict[str, Any]) -> list[Claimed]:
        name = _text(consumer["name"])
        if name == self.worker or self._client.exists(keys.heartbeat(name)):
            return []
        stream = keys.queue(adapter)
        if int(consumer["pending"]) == 0:
            self._client.xgroup_delconsumer(stream, keys.GROUP, name)
            return []
        pending: Any = self._client.xpending_range(
            stream, keys.GROUP, "-", "+", 100, consumername=name
        )
        deliveries = {_text(p["message_id"]): int(p["times_delivered"]) + 1 for p in pending}
        # The idle guard makes a takeover exclusive: XCLAIM resets the idle time, so a second
        # worker sweeping at the same moment claims nothing.
        guard_ms = min(TAKEOVER_GUARD_MS, int(self.limits.heartbeat_ttl_s * 500))
        entries: Any = self._client.xclaim(
            stream, keys.GROUP, self.worker, guard_ms, list(deliveries)
        )
        pairs = [(_text(eid), fields[keys.PAYLOAD.encode()]) for eid, fields in entries if fields]
        return self._decoded(adapter, pairs, deliveries)

    def _decoded(
        self, adapter: str, pairs: list[tuple[str, bytes]], deliveries: dict[str, int]
    ) -> list[Claimed]:
        """Claimed jobs; an entry whose payload does not decode goes to the dead-letter
        stream on its own (acked), so it never holds up the jobs claimed with it."""
        out = []
        for entry_id, payload in pairs:
            try:
                job = keys.decode_job(payload)
            except DecodeError:
                self._client.xadd(
                    keys.DEAD,
                    {keys.PAYLOAD: payload, "reason": "undecodable job", "adapter": adapter},
                    maxlen=self.limits.dead_letter_maxlen,
                    approximate=True,
                )
                self._ack(keys=[keys.queue(adapter), keys.TOTAL], args=[entry_id])
                continue
            out.append(Claimed(entry_id, adapter, job, deliveries.get(entry_id, 1)))
        return out

    def dead_letter(self, claimed: Claimed, reason: str) -> None:
        """Park a job that keeps failing, then ack it."""
        self._client.xadd(
            keys.DEAD,
            {
                keys.PAYLOAD: keys.encode_job(claimed.job),
                "reason": reason,
                "adapter": claimed.adapter,
            },
            maxlen=self.limits.dead_letter_maxlen,
            approximate=True,
        )
        self.ack(claimed)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
