"""The Redis store: every proxy pointing at the same server shares the answers it keeps.

The bounds hold across processes: one Lua script per put stores the answer with its time to
live (`PX`), notes it in an LRU index (a sorted set scored by a counter bumped at every use, so
the order is exact however close two uses are) and in an index by when it was made (Redis's own
clock), with its size; then it drops the entries past their TTL and evicts from the cold end
until both `max_entries` and `max_bytes` hold again. A get bumps the entry's place. Keys:
`<prefix>:answer:<digest>`, `<prefix>:lru`, `<prefix>:made`, `<prefix>:size`, `<prefix>:bytes`,
`<prefix>:seq` (one Redis server, not a cluster: the script derives the answers' keys).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.runtime.cache.entry import Entry, Stats, StoreUnavailable, decode, encode

_DROP = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function drop(member)
  local size = tonumber(redis.call('HGET', KEYS[3], member) or '0')
  redis.call('HDEL', KEYS[3], member)
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZREM', KEYS[2], member)
  redis.call('DECRBY', KEYS[4], size)
  return redis.call('DEL', ARGV[1] .. member)
end
"""

# KEYS: lru, made, size, bytes, seq. ARGV: answer-key prefix, member, value, ttl_ms,
# max_entries, max_bytes. Returns {evicted for entries, for bytes, expired, entries, bytes}.
_PUT = (
    _DROP
    + """
local member, value, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local max_entries, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
if redis.call('ZSCORE', KEYS[1], member) then drop(member) end
local expired = 0
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl)) do
  drop(old)
  expired = expired + 1
end
redis.call('SET', ARGV[1] .. member, value, 'PX', ttl)
redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[5]), member)
redis.call('ZADD', KEYS[2], now, member)
redis.call('HSET', KEYS[3], member, #value)
local bytes = redis.call('INCRBY', KEYS[4], #value)
local by_entries, by_bytes = 0, 0
while redis.call('ZCARD', KEYS[1]) > max_entries do
  drop(redis.call('ZRANGE', KEYS[1], 0, 0)[1])
  by_entries = by_entries + 1
end
bytes = tonumber(redis.call('GET', KEYS[4]))
while bytes > max_bytes and redis.call('ZCARD', KEYS[1]) > 0 do
  drop(redis.call('ZRANGE', KEYS[1], 0, 0)[1])
  by_bytes = by_bytes + 1
  bytes = tonumber(redis.call('GET', KEYS[4]))
end
return {by_entries, by_bytes, expired, redis.call('ZCARD', KEYS[1]), bytes}
"""
)

# KEYS: as for a put. ARGV: answer-key prefix, member. Returns {value or '', expired 0/1}.
_GET = (
    _DROP
    + """
local value = redis.call('GET', ARGV[1] .. ARGV[2])
if value then
  redis.call('ZADD', KEYS[1], 'XX', redis.call('INCR', KEYS[5]), ARGV[2])
  return {value, 0}
end
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  drop(ARGV[2])
  return {'', 1}
end
return {'', 0}
"""
)


class RedisStore:
    """Answers in one Redis server (`redis://host:port/db`, `rediss://`, `unix://`)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        max_entries: int,
        max_bytes: int,
        ttl: float,
        timeout: float = 0.25,
    ) -> None:
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._keys = [f"{prefix}:{name}" for name in ("lru", "made", "size", "bytes", "seq")]
        self._answers = f"{prefix}:answer:"
        self._limits = [str(max(1, round(ttl * 1000))), str(max_entries), str(max_bytes)]
        self._put: Any = self._client.register_script(_PUT)
        self._get: Any = self._client.register_script(_GET)
        self.stats = Stats()  # this process's view: its own evictions, the last sizes seen

    async def get(self, key: str) -> Entry | None:
        try:
            value, expired = await self._get(keys=self._keys, args=[self._answers, key])
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}"[:200]) from None
        self.stats.evict("expired", int(expired))
        return decode(value) if value else None

    async def put(self, key: str, entry: Entry) -> None:
        try:
            out = await self._put(
                keys=self._keys, args=[self._answers, key, encode(entry), *self._limits]
            )
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}"[:200]) from None
        by_entries, by_bytes, expired, entries, size = (int(v) for v in out)
        stats = self.stats
        stats.evict("entries", by_entries)
        stats.evict("bytes", by_bytes)
        stats.evict("expired", expired)
        stats.entries, stats.bytes = entries, size

    async def aclose(self) -> None:
        await self._client.aclose()
