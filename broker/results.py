"""Result streams: one per request, ordered events, exactly one terminal event.

A worker `begin`s each delivery of a job (which bumps the request's attempt number), then
publishes events tagged with that attempt. Publishing is a script that drops events of a
stale attempt and everything after the terminal event, so a worker that was presumed dead
cannot interleave with the one that took its job over. The gateway reads with XREAD.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from broker import keys
from protos.lorapool.v1 import queue_pb2

# KEYS: meta. Returns {state, n}: 1 ready (n = attempt), -1 lost, -2 done, -3 tokens already
# sent by an earlier attempt (n = how many), -4 cancelled.
_BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local m = redis.call('HMGET', KEYS[1], 'sent', 'done', 'cancel')
if m[2] then return {-2, 0} end
if m[3] then return {-4, 0} end
local sent = tonumber(m[1] or '0')
if sent > 0 then return {-3, sent} end
return {1, redis.call('HINCRBY', KEYS[1], 'attempt', 1)}
"""

# KEYS: meta, results. ARGV: attempt (0: any), payload, terminal (0/1), tokens, ttl ms.
# Returns 1 published, 0 dropped (request gone, already finished, or stale attempt).
_PUBLISH = """
local m = redis.call('HMGET', KEYS[1], 'attempt', 'done')
if not m[1] or m[2] then return 0 end
if ARGV[1] ~= '0' and m[1] ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], '*', 'ev', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('HINCRBY', KEYS[1], 'sent', ARGV[4])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'done', 1) end
return 1
"""

# KEYS: meta of each request. ARGV: abandon after ms. One flag per request, compared with
# Redis TIME so host clocks do not matter: lost (no meta), cancel, abandoned (no reader seen
# for that long), or '' (carry on).
_FLAGS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local m = redis.call('HMGET', key, 'attempt', 'cancel', 'seen')
  if not m[1] then out[i] = 'lost'
  elseif m[2] then out[i] = 'cancel'
  elseif m[3] and now - tonumber(m[3]) > tonumber(ARGV[1]) then out[i] = 'abandoned'
  else out[i] = '' end
end
return out
"""

# KEYS: meta. A reader is reading: `seen` = Redis TIME in ms (if the request still exists).
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'seen', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
return 1
"""


class StartState(enum.IntEnum):
    READY = 1
    LOST = -1  # the request's keys expired or Redis lost them: drop the job
    DONE = -2  # a terminal event was already published: just ack
    TOKENS_SENT = -3  # an earlier attempt streamed tokens: end with a retryable status
    CANCELLED = -4


@dataclass(frozen=True)
class Start:
    state: StartState
    attempt: int = 0  # when READY
    sent: int = 0  # when TOKENS_SENT


@dataclass(frozen=True)
class Outgoing:
    """One event to publish for one request."""

    request_id: str
    attempt: int  # 0: publish whatever the attempt (terminal failures of orphaned jobs)
    event: queue_pb2.Event
    ttl_ms: int
    tokens: int = 0

    @property
    def terminal(self) -> bool:
        return self.event.WhichOneof("kind") in ("final", "failure")


class Publisher:
    """A worker's side: begin a delivery, publish events, poll cancel flags (sync redis)."""

    def __init__(self, client: redis.Redis, limits: keys.Limits | None = None) -> None:
        self._client = client
        self._abandon_ms = int((limits or keys.Limits()).abandon_after_s * 1000)
        self._begin = client.register_script(_BEGIN)
        self._publish = client.register_script(_PUBLISH)
        self._flags = client.register_script(_FLAGS)

    def begin(self, request_id: str) -> Start:
        state, n = self._begin(keys=[keys.meta(request_id)])
        state = StartState(int(state))
        if state is StartState.READY:
            return Start(state, attempt=int(n))
        return Start(state, sent=int(n))

    def publish(self, batch: list[Outgoing]) -> list[bool]:
        """Publish in order, one round trip; True where the event was taken.

        Each event is stamped with its attempt. A batch retried after a partial failure may
        publish some events twice; readers drop an (attempt, seq) they already relayed.
        """
        if not batch:
            return []
        pipe = self._client.pipeline(transaction=False)
        for out in batch:
            event = queue_pb2.Event()
            event.CopyFrom(out.event)
            event.attempt = out.attempt
            self._publish(
                keys=[keys.meta(out.request_id), keys.results(out.request_id)],
                args=[
                    out.attempt,
                    keys.encode_event(event),
                    int(out.terminal),
                    out.tokens,
                    out.ttl_ms,
                ],
                client=pipe,
            )
        return [bool(r) for r in pipe.execute()]

    def flags(self, request_ids: list[str]) -> dict[str, str]:
        """Why requests should stop; the others are absent. One round trip.

        `lost`: Redis no longer knows the request. `cancel`: the client cancelled, or its
        deadline passed. `abandoned`: no gateway has read its result stream for
        `Limits.abandon_after_s` (by Redis time): nobody is listening, stop like a cancel.
        """
        if not request_ids:
            return {}
        reply = self._flags(keys=[keys.meta(rid) for rid in request_ids], args=[self._abandon_ms])
        flags = (f.decode() if isinstance(f, bytes) else str(f) for f in reply)
        return {rid: flag for rid, flag in zip(request_ids, flags, strict=True) if flag}


class Reader:
    """The gateway's side: read a request's events in order (redis.asyncio).

    Every read also refreshes the request's `seen` (one round trip for both), which is how
    workers tell a request someone reads from an abandoned one.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    async def read(
        self, request_id: str, after: str, block_ms: int
    ) -> list[tuple[str, queue_pb2.Event]]:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.eval(_TOUCH, 1, keys.meta(request_id))
            pipe.xread({keys.results(request_id): after}, count=256, block=block_ms)
            _touched, reply = await pipe.execute()
        events: list[tuple[str, queue_pb2.Event]] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                events.append((eid, keys.decode_event(fields[keys.EVENT.encode()])))
        return events
