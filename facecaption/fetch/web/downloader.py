"""HTTP(S) downloads with asyncio: one typed result per URL, polite, safe and bounded.

Knows nothing of shards, images or storage. `get` never raises for a bad URL or a bad server;
it returns a `Download` whose status is one of:

  ok, http_error, timeout, dns_error, connection_error, too_large, invalid_url,
  invalid_redirect, invalid_response, blocked_address, robots_disallowed, robots_unavailable,
  opted_out

A URL is parsed and checked before anything is sent (see `urls`): what is not a URL we may
request is `invalid_url`, a redirect to one is `invalid_redirect` (a `Location` that is
missing, empty, unparseable, longer than a request line servers read, or names a host, port
or scheme we refuse). An answer aiohttp cannot parse as HTTP (a bad status line, a header
line over `MAX_HEADER_FIELD_BYTES`, too many headers, bytes not allowed in a header, a bad
Content-Length or chunk size) is `invalid_response`. Header lines are read up to 64 KiB, not
aiohttp's 8 KiB, so that an over-long `Location` reaches the redirect checks: past the limit,
aiohttp reports only that a line was too long, without its header's name or the status, so
a redirect can no longer be told from any other answer.

Every hop of a download (redirects are followed here, not by aiohttp) is checked in order:
scheme, the address it resolves to (see `guard`), robots.txt (fetched once per origin), then it
waits for a per-host slot (see `throttle`: each host's rate adapts to how it answers, and its
robots.txt `Crawl-delay` caps it; with `host_budget_redis_url`, every process shares one
budget per host, see `budget`). Response headers are read before the body: an error
status, an `X-Robots-Tag` opt-out or a too-large Content-Length ends the download without
reading the body; otherwise the body streams in under `max_bytes`. One deadline covers the
time on the wire of an attempt, redirects and trickling bodies included (time queued for a
host's slot or pause does not count).

Connection failures, 408/425/429 and 5xx are retried within the run with exponential
backoff and jitter; a `Retry-After` on 429/503 pauses the whole host instead. Every answer
(and timeout or failed connection) is reported to the host's throttle. Timeouts have
their own budget (`timeout_retries`, 0 by default): each costs a full deadline, so they are
usually better left to the per-URL retry of a later run.
Everything else is final at the first answer. `retry_later` says which statuses a later run
should try again.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import socket
import time
from dataclasses import dataclass, replace
from typing import TypeVar

import aiohttp
from yarl import URL

from facecaption.fetch.web.budget import RedisBudget
from facecaption.fetch.web.consent import opt_out_directive
from facecaption.fetch.web.guard import (
    AddressGuard,
    BlockedAddressError,
    GuardedResolver,
    describe_blocked,
    literal_address,
)
from facecaption.fetch.web.robots import RobotsTxt
from facecaption.fetch.web.throttle import HostQueue, HostThrottle, RateBudget, host_key
from facecaption.fetch.web.urls import UnusableURL, parse_url, resolve_location
from facecaption.settings import FetchSettings

TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
RETRY_NOW = frozenset({"timeout", "connection_error"})
RETRY_LATER = RETRY_NOW | {"dns_error", "robots_unavailable"}
_CHUNK = 64 * 1024
# The longest header line (name and value) read; aiohttp's default is 8190. At most 128 of
# them (aiohttp's max_headers): 8 MiB of headers per answer at worst, under `max_bytes`.
MAX_HEADER_FIELD_BYTES = 64 * 1024
# aiohttp's parser errors quote the offending line, which a hostile server makes 60 KB long.
_ERROR_CHARS = 300
T = TypeVar("T")


def retry_later(status: str, http_status: int | None) -> bool:
    """Whether a later run should fetch this row again (transient failures only)."""
    return status in RETRY_LATER or (status == "http_error" and http_status in TRANSIENT_HTTP)


@dataclass(frozen=True)
class Download:
    status: str
    body: bytes | None = None
    http_status: int | None = None
    error: str | None = None
    attempts: int = 1
    retry_after_s: float | None = None

    @property
    def retry_now(self) -> bool:
        return self.status in RETRY_NOW or (
            self.status == "http_error" and self.http_status in TRANSIENT_HTTP
        )


class Downloader:
    """An aiohttp session with our limits; `async with Downloader(limits) as downloader`.

    One downloader serves one shard: its DNS and robots.txt caches live as long as it does.
    """

    def __init__(
        self,
        limits: FetchSettings,
        start_rates: dict[str, float] | None = None,
        budget: RateBudget | None = None,
    ) -> None:
        self.limits = limits
        self.guard = AddressGuard(limits.allow_networks)
        self.hosts = HostThrottle(limits, start_rates, budget)
        self._resolver = GuardedResolver(self.guard)
        self._robots: dict[str, asyncio.Future[RobotsTxt | Download]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._shared: RedisBudget | None = None  # fetch.host_budget_redis_url's budget

    async def __aenter__(self) -> Downloader:
        if self.limits.host_budget_redis_url and self.hosts.adaptive and not self.hosts.budget:
            self._shared = RedisBudget(self.limits.host_budget_redis_url)
            self.hosts.budget = self._shared
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.limits.concurrency,
                resolver=self._resolver,
                use_dns_cache=False,  # the guarded resolver caches, and checks
                family=socket.AF_UNSPEC,
            ),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.limits.connect_timeout_s,
                sock_read=self.limits.read_timeout_s,
            ),
            headers={"User-Agent": self.limits.user_agent},
            auto_decompress=True,
            max_field_size=MAX_HEADER_FIELD_BYTES,
            trust_env=False,  # a proxy would connect on our behalf, past the address checks
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._shared is not None:
            await self._shared.close()

    # -- one URL ------------------------------------------------------------------------

    def queue(self, items: list[tuple[URL, T]]) -> HostQueue[T]:
        """`items` queued by their URL's host: `take` hands out one whose host may take a
        request now, with a slot reserved for it; pass `reserved=True` to `get` with it."""
        return HostQueue(self.hosts, ((host_key(url.host), item) for url, item in items))

    async def get(self, raw_url: object, reserved: bool = False) -> Download:
        """Download `raw_url`: a `URL` from `parse_url`, or outside text that is parsed here.
        With `reserved`, a slot of its host was reserved for it (`queue`)."""
        if isinstance(raw_url, URL):
            url = raw_url
        else:
            if reserved:
                raise ValueError("a reserved slot needs a URL that `queue` took")
            try:
                url = parse_url(raw_url, self.limits.allowed_schemes)
            except UnusableURL as error:
                return Download("invalid_url", error=str(error), attempts=0)
        attempt = 0
        while True:
            attempt += 1
            result = await self._attempt(
                url, self.limits.max_bytes, check_robots=True, reserved=reserved
            )
            reserved = False
            budget = (
                self.limits.timeout_retries if result.status == "timeout" else self.limits.retries
            )
            if not result.retry_now or attempt > budget:
                return replace(result, attempts=attempt)
            if result.retry_after_s is not None:
                if result.retry_after_s > self.limits.retry_after_max_s:
                    return replace(result, attempts=attempt)
                continue  # the host is paused; its slot waits the pause out
            await asyncio.sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.limits.backoff_max_s, self.limits.backoff_base_s * 2 ** (attempt - 1))
        return ceiling * (0.5 + random.random() / 2)

    async def _attempt(
        self,
        url: URL,
        max_bytes: int,
        *,
        check_robots: bool,
        truncate: bool = False,
        deadline_s: float | None = None,
        reserved: bool = False,
    ) -> Download:
        """One try, redirects included. With `truncate`, a body over `max_bytes` is cut there
        instead of refused; with `reserved`, the first hop has its host's slot already."""
        try:
            return await self._follow(
                url,
                max_bytes,
                check_robots,
                truncate,
                deadline_s or self.limits.total_timeout_s,
                reserved,
            )
        except BlockedAddressError as error:
            return Download("blocked_address", error=str(error))
        except aiohttp.ClientConnectorDNSError as error:
            if isinstance(error.os_error, BlockedAddressError):
                return Download("blocked_address", error=str(error.os_error))
            return Download("dns_error", error=str(error))
        except aiohttp.ClientResponseError as error:
            # raised while reading the status line and headers: not an answer we can read
            message = " ".join(str(error.message).split())  # one line, as other errors
            return Download("invalid_response", error=message[:_ERROR_CHARS])
        except aiohttp.InvalidURL as error:
            return Download("invalid_url", error=f"invalid url or redirect target: {error}")
        except (aiohttp.ClientError, OSError) as error:
            return Download("connection_error", error=f"{type(error).__name__}: {error}")

    async def _follow(
        self,
        url: URL,
        max_bytes: int,
        check_robots: bool,
        truncate: bool,
        deadline_s: float,
        reserved: bool,
    ) -> Download:
        """Request `url` and the redirects it leads to. The deadline counts time on the wire
        (connect, wait, body) over all hops, not time queued for a host's slot or pause.
        With `reserved`, the first hop uses the slot reserved for it (given back if the hop
        is refused before it is sent)."""
        unused = [reserved]  # the reservation, until the first hop takes it
        try:
            return await self._hops(url, max_bytes, check_robots, truncate, deadline_s, unused)
        finally:
            if unused[0]:
                self.hosts.release(host_key(url.host))

    async def _hops(
        self,
        url: URL,
        max_bytes: int,
        check_robots: bool,
        truncate: bool,
        deadline_s: float,
        unused: list[bool],
    ) -> Download:
        assert self._session is not None, "use Downloader as an async context manager"
        loop = asyncio.get_running_loop()
        remaining = deadline_s
        status = None
        reserved = unused[0]
        for _hop in range(self.limits.max_redirects + 1):
            refused = await self._refuse(url, check_robots)
            if refused is not None:
                return refused
            host = host_key(url.host)
            unused[0] = False
            # robots.txt itself (fetched without checking robots.txt) is one request per
            # origin and takes no slot: the rows waiting for it may hold them all
            slot = self.hosts.slot(host, reserved) if check_robots else self.hosts.unlimited()
            async with slot as started:
                reserved = False
                try:
                    async with (
                        asyncio.timeout(remaining),
                        self._session.get(url, allow_redirects=False) as response,
                    ):
                        status = response.status
                        if status in (429, 503):
                            self.hosts.pushed_back(host, started, status)
                        else:
                            self.hosts.answered(host, started, loop.time() - started)
                        location = response.headers.get("Location")
                        if status not in REDIRECTS:
                            return await self._read(url, response, max_bytes, truncate)
                except TimeoutError:
                    self.hosts.pushed_back(host, started, "timeout")
                    return Download("timeout", error=f"no complete answer in {deadline_s}s")
                except aiohttp.ClientConnectorDNSError:
                    raise
                except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError):
                    self.hosts.pushed_back(host, started, "connection_error")
                    raise
                remaining -= loop.time() - started
            try:
                url = resolve_location(url, location, self.limits.allowed_schemes)
            except UnusableURL as error:
                return Download("invalid_redirect", http_status=status, error=str(error))
        return Download(
            "http_error",
            http_status=status,
            error=f"more than {self.limits.max_redirects} redirects",
        )

    async def _refuse(self, url: URL, check_robots: bool) -> Download | None:
        """The reason not to request `url` at all, if there is one."""
        host = url.host or ""
        address = literal_address(host)
        if address is not None:
            reason = self.guard.blocked_reason(address)
            if reason:
                return Download("blocked_address", error=f"host is {describe_blocked(reason)}")
        else:
            try:
                async with asyncio.timeout(self.limits.connect_timeout_s):
                    await self._resolver.resolve(host, url.port or 0, socket.AF_UNSPEC)
            except TimeoutError:
                return Download("dns_error", error=f"{host}: no answer in time")
            except BlockedAddressError as error:
                return Download("blocked_address", error=str(error))
            except OSError as error:
                return Download("dns_error", error=f"{host}: {error}")
            except UnicodeError as error:  # the IDNA codec; `parse_url` checks the same first
                return Download("invalid_url", error=f"{host}: {error}")
        if check_robots and self.limits.respect_robots_txt:
            robots = await self._robots_for(url)
            if isinstance(robots, Download):
                return robots
            if not robots.allows(self.limits.user_agent_token, url.raw_path_qs):
                why = robots.refusal or f"{url.raw_path} disallowed for us"
                return Download("robots_disallowed", error=why)
            delay = robots.crawl_delay(self.limits.user_agent_token)
            if delay:
                self.hosts.limit_rate(host_key(host), 1.0 / delay)
        return None

    async def _read(
        self, url: URL, response: aiohttp.ClientResponse, max_bytes: int, truncate: bool
    ) -> Download:
        status = response.status
        if status >= 400:
            retry_after = _retry_after_s(response.headers.get("Retry-After"))
            if retry_after is not None and status in (429, 503):
                pause = min(retry_after, self.limits.retry_after_max_s)
                self.hosts.pause(host_key(url.host), pause)
            return Download(
                "http_error",
                http_status=status,
                error=response.reason or f"HTTP {status}",  # a status line may have no reason
                retry_after_s=retry_after,
            )
        directive = opt_out_directive(
            response.headers.getall("X-Robots-Tag", []),
            self.limits.user_agent_token,
            self.limits.opt_out_directives,
        )
        if directive:
            response.close()  # hang up before the body
            return Download("opted_out", http_status=status, error=f"X-Robots-Tag: {directive}")
        declared = response.content_length
        if truncate:
            head = bytearray()
            async for chunk in response.content.iter_chunked(_CHUNK):
                head += chunk[: max_bytes - len(head)]
                if len(head) >= max_bytes:
                    response.close()
                    break
            return Download("ok", bytes(head), http_status=status)
        if declared is not None and declared > max_bytes:
            response.close()
            return Download(
                "too_large", http_status=status, error=f"Content-Length {declared} > {max_bytes}"
            )
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > max_bytes:
                response.close()
                return Download(
                    "too_large", http_status=status, error=f"body exceeds {max_bytes} bytes"
                )
        return Download("ok", bytes(body), http_status=status)

    # -- robots.txt -----------------------------------------------------------------------

    async def _robots_for(self, url: URL) -> RobotsTxt | Download:
        origin = str(url.origin())
        if origin not in self._robots:
            self._robots[origin] = asyncio.ensure_future(self._fetch_robots(url.origin()))
        return await asyncio.shield(self._robots[origin])

    async def _fetch_robots(self, origin: URL) -> RobotsTxt | Download:
        """The origin's robots.txt (an empty one when it has none), or why there is none.

        A server error means `robots_unavailable` (RFC 9309: assume everything disallowed);
        a network failure is reported as itself, since the image would meet it too. Only the
        first `robots_max_bytes` are read (the RFC asks for at least 500 KiB)."""
        robots_url = origin.with_path("/robots.txt")
        result = await self._attempt(
            robots_url,
            self.limits.robots_max_bytes,
            check_robots=False,
            truncate=True,
            deadline_s=self.limits.robots_timeout_s,
        )
        if result.status == "ok":
            return RobotsTxt.parse((result.body or b"").decode("utf-8", errors="replace"))
        if result.status == "http_error" and (result.http_status or 500) < 500:
            return RobotsTxt(allow_all=True)
        if result.status == "http_error":
            return Download(
                "robots_unavailable",
                http_status=result.http_status,
                error=f"{robots_url} answered {result.http_status}",
            )
        return replace(result, error=f"{robots_url}: {result.error}")


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # float() refuses some other digits ("²")
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
