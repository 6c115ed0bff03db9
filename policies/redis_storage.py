"""Rate-limit buckets in Redis, shared by every proxy process that points at the same server.

One Lua script applies all charges of a request atomically, with the Redis server's clock
(`TIME`), so proxies on hosts with skewed clocks still agree. TATs are stored in milliseconds as
decimal strings (`%.3f`): Lua numbers are doubles and Redis truncates numbers it returns, so
every value crosses the boundary as a string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from policies.buckets import Charge, Decision, Storage, StorageUnavailable

# KEYS: bucket keys. ARGV[1]: "1" to force; then per bucket i: interval_ms (3i-1),
# window_ms (3i), cost (3i+1). Returns {allowed, retry_ms, used_ms per bucket}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local force = ARGV[1] == '1'
local tats, news = {}, {}
local retry = 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i - 1])
  local window = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  local new = tat + cost * interval
  if new < now then new = now end
  if cost > 0 and not force and new - now > window + 0.000001 then
    local wait = new - window - now
    if wait > retry then retry = wait end
  end
  tats[i] = tat
  news[i] = new
end
local allowed = retry == 0
local out = {allowed and 1 or 0, string.format('%.3f', retry)}
for i = 1, #KEYS do
  local value = tats[i]
  if allowed then
    value = news[i]
    redis.call('SET', KEYS[i], string.format('%.3f', value), 'PX', math.ceil(value - now) + 1000)
  end
  out[#out + 1] = string.format('%.3f', value - now)
end
return out
"""


class RedisStorage(Storage):
    """Buckets in one Redis server (`redis://host:port/db`, `rediss://`, `unix://`)."""

    def __init__(self, url: str, *, timeout: float = 0.25) -> None:
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._script: Any = self._client.register_script(_SCRIPT)

    async def charge(self, charges: Sequence[Charge], *, force: bool = False) -> Decision:
        args: list[str] = ["1" if force else "0"]
        for bucket, cost in charges:
            args += [repr(bucket.interval * 1000), repr(bucket.window * 1000), repr(float(cost))]
        try:
            out = await self._script(keys=[b.key for b, _ in charges], args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"redis: {type(exc).__name__}: {exc}"[:200]) from None
        allowed = int(out[0]) == 1
        retry = float(out[1]) / 1000.0
        return Decision(allowed, retry, [max(0.0, float(used) / 1000.0) for used in out[2:]])

    async def aclose(self) -> None:
        await self._client.aclose()
