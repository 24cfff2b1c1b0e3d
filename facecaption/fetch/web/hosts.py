"""Per-host politeness: a concurrency limit, a request rate, and pauses asked for by servers.

Every request to a host takes a slot: at most `concurrency` at once, started at least
`1 / rate` seconds apart, and not before a pause the host asked for with `Retry-After` has
passed. Start times are reserved before sleeping, so waiting requests are spaced out rather
than released together.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass
class _Host:
    slots: asyncio.Semaphore
    next_start: float = 0.0
    paused_until: float = 0.0


class HostLimiter:
    def __init__(self, concurrency: int, rate_per_s: float) -> None:
        self.concurrency = concurrency
        self.interval = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
        self._hosts: dict[str, _Host] = {}

    def _host(self, host: str) -> _Host:
        if host not in self._hosts:
            self._hosts[host] = _Host(asyncio.Semaphore(self.concurrency))
        return self._hosts[host]

    @asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[None]:
        state = self._host(host)
        async with state.slots:
            now = asyncio.get_running_loop().time()
            start = max(now, state.next_start, state.paused_until)
            state.next_start = start + self.interval
            if start > now:
                await asyncio.sleep(start - now)
            yield

    def pause(self, host: str, seconds: float) -> None:
        """No new request to `host` for `seconds` (a 429/503 with Retry-After)."""
        state = self._host(host)
        state.paused_until = max(state.paused_until, asyncio.get_running_loop().time() + seconds)
