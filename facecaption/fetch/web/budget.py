"""One request budget per host shared by every process fetching at once: a token bucket in
Redis (`fetch.host_budget_redis_url`).

Each host has a bucket (`facecaption:host:<host>`) refilled at a rate and holding at most a
burst of tokens. A process takes one token before each request to the host (one Lua script,
atomic in Redis); when the bucket is empty it is told how long to wait for the next token,
which is its own: the bucket goes negative by one, so processes queue in the bucket instead
of racing for it. The rate is the lowest any process asks for: each process passes its own
adaptive rate, and a host's bucket keeps the lowest asked within the last
`RATE_MEMORY_S`, so one process's cut (the host pushed back at it) slows every process, and
the rate rises again only as they all rise. Without the setting every process keeps its own
rates (`throttle` alone): N processes may then ask one host N times its rate.
"""

from __future__ import annotations

from typing import Any

KEY_PREFIX = "facecaption:host:"
# How long a host's bucket remembers the lowest rate a process asked for.
RATE_MEMORY_S = 2.0
# Buckets of hosts no one asked for a while expire (seconds).
IDLE_EXPIRY_S = 600

# KEYS[1] the bucket; ARGV: rate, burst, rate memory, expiry. Returns the seconds to wait
# (as text: Lua numbers become integers on the way back).
_TAKE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
local asked = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local memory = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'rate', 'rate_at')
local tokens = tonumber(state[1])
local at = tonumber(state[2]) or now
local rate = tonumber(state[3])
local rate_at = tonumber(state[4]) or now
if tokens == nil then tokens = burst end
if rate == nil or asked <= rate or now - rate_at > memory then
  rate = asked
  rate_at = now
end
tokens = math.min(burst, tokens + (now - at) * rate)
tokens = tokens - 1
local wait = 0
if tokens < 0 then wait = -tokens / rate end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now, 'rate', rate, 'rate_at', rate_at)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return tostring(wait)
"""


class RedisBudget:
    """A `throttle.RateBudget` in Redis; `await budget.close()` when done."""

    def __init__(self, url: str) -> None:
        import redis.asyncio  # imported when configured: only then is it needed

        self._redis: Any = redis.asyncio.Redis.from_url(url)
        self._take = self._redis.register_script(_TAKE)

    async def acquire(self, host: str, rate: float, burst: float) -> float:
        """Take one start from `host`'s bucket; the seconds to wait before starting."""
        wait = await self._take(
            keys=[KEY_PREFIX + host], args=[rate, burst, RATE_MEMORY_S, IDLE_EXPIRY_S]
        )
        return float(wait)

    async def close(self) -> None:
        await self._redis.aclose()
