"""Loopback hosts with a capacity: each takes so many requests per second and answers 429 above
it, as a small site behind a rate limiter does. aiohttp, in a thread (and event loop) of its
own, so the client under test runs in the test's process or in others.

Each host (a 127.x.y.z address of its own) has a token bucket refilled at `capacity` requests
per second, holding at most one second's worth (at least one). A request that finds a token
gets its image; one that finds none is over capacity: 429, with `Retry-After` when the host
says so. The capacity can change while it runs (a host that gets busy). Every host counts the
requests it saw, the 429s it answered and the most it had in flight; `robots.txt` is served
from `robots` (404 when unset) and not counted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Host:
    address: str
    capacity: float  # requests/s; 0: no limit
    retry_after: str | None = None  # e.g. "1": sent with every 429
    latency_s: float = 0.0
    robots: str | None = None
    requests: int = 0
    over_capacity: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    port: int = 0
    _tokens: float = 0.0
    _refilled: float = field(default_factory=time.monotonic)

    def url(self, path: str) -> str:
        return f"http://{self.address}:{self.port}/{path.lstrip('/')}"

    def set_capacity(self, capacity: float) -> None:
        """From now on (the bucket keeps at most a second's worth of the new capacity)."""
        self.capacity = capacity
        self._tokens = min(self._tokens, max(1.0, capacity))

    def _admit(self) -> bool:
        if not self.capacity:
            return True
        now = time.monotonic()
        burst = max(1.0, self.capacity)
        self._tokens = min(burst, self._tokens + (now - self._refilled) * self.capacity)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class RateSite:
    """`with RateSite(hosts, body) as site:` serves every path of every host; `body(path)`
    gives the bytes (and content type) of an image."""

    def __init__(self, hosts: list[Host], body) -> None:  # noqa: ANN001 (a callable)
        self.hosts = {host.address: host for host in hosts}
        self.body = body
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runners: list[web.AppRunner] = []

    def host(self, address: str) -> Host:
        return self.hosts[address]

    def _app(self, host: Host) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            path = request.path.lstrip("/")
            if path == "robots.txt":
                if host.robots is None:
                    return web.Response(status=404, text="none")
                return web.Response(text=host.robots, content_type="text/plain")
            host.requests += 1
            host.in_flight += 1
            host.max_in_flight = max(host.max_in_flight, host.in_flight)
            try:
                if host.latency_s:
                    await asyncio.sleep(host.latency_s)
                if not host._admit():
                    host.over_capacity += 1
                    headers = {"Retry-After": host.retry_after} if host.retry_after else {}
                    return web.Response(status=429, text="slow down", headers=headers)
                body, content_type = self.body(f"{host.address}/{path}")
                return web.Response(body=body, content_type=content_type)
            finally:
                host.in_flight -= 1

        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        return app

    async def _start(self) -> None:
        for host in self.hosts.values():
            runner = web.AppRunner(self._app(host), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, host.address, host.port, backlog=1024)
            await site.start()
            host.port = runner.addresses[0][1]
            self._runners.append(runner)

    async def _stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    def __enter__(self) -> RateSite:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
