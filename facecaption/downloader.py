"""HTTP(S) downloads with asyncio: one typed result per URL, retries only for transient failures.

Knows nothing of shards, images or storage. Each `get` returns a `Download` whose status is
one of `ok`, `http_error`, `timeout`, `dns_error`, `connection_error`, `too_large` or
`invalid_url`; it never raises for a bad URL or a bad server. Timeouts, connection failures,
408/429 and 5xx are retried with exponential backoff and jitter (honouring a numeric
`Retry-After` up to the backoff cap); everything else is final at the first answer.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import aiohttp
from yarl import URL

from facecaption.settings import FetchSettings

ALLOWED_SCHEMES = ("http", "https")
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
TRANSIENT_STATUSES = frozenset({"timeout", "connection_error"})
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Download:
    status: str
    body: bytes | None = None
    http_status: int | None = None
    error: str | None = None
    attempts: int = 1
    retry_after_s: float | None = None

    @property
    def transient(self) -> bool:
        return self.status in TRANSIENT_STATUSES or (
            self.status == "http_error" and self.http_status in TRANSIENT_HTTP
        )


def parse_url(raw: object) -> URL | str:
    """A URL we may fetch, or the reason it is invalid."""
    if not isinstance(raw, str) or not raw.strip():
        return "empty url"
    try:
        url = URL(raw.strip())
    except (ValueError, TypeError) as error:
        return f"unparseable url: {error}"
    if url.scheme not in ALLOWED_SCHEMES:
        return f"scheme {url.scheme!r} not allowed"
    if not url.host:
        return "url has no host"
    return url


class Downloader:
    """An aiohttp session with our limits; use as `async with Downloader(limits) as d`."""

    def __init__(self, limits: FetchSettings) -> None:
        self.limits = limits
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Downloader:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.limits.concurrency, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=self.limits.total_timeout_s,
                sock_connect=self.limits.connect_timeout_s,
                sock_read=self.limits.read_timeout_s,
            ),
            headers={"User-Agent": self.limits.user_agent},
            auto_decompress=True,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def get(self, raw_url: object) -> Download:
        url = parse_url(raw_url)
        if isinstance(url, str):
            return Download("invalid_url", error=url, attempts=0)
        attempt = 0
        while True:
            attempt += 1
            result = await self._attempt(url)
            if not result.transient or attempt > self.limits.retries:
                return Download(**{**result.__dict__, "attempts": attempt})
            await asyncio.sleep(self._backoff(attempt, result.retry_after_s))

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.limits.backoff_max_s)
        ceiling = min(self.limits.backoff_max_s, self.limits.backoff_base_s * 2 ** (attempt - 1))
        return ceiling * (0.5 + random.random() / 2)

    async def _attempt(self, url: URL) -> Download:
        assert self._session is not None, "use Downloader as an async context manager"
        try:
            async with self._session.get(url, allow_redirects=True, max_redirects=10) as response:
                if response.status >= 400:
                    return Download(
                        "http_error",
                        http_status=response.status,
                        error=response.reason,
                        retry_after_s=_retry_after(response),
                    )
                declared = response.content_length
                if declared is not None and declared > self.limits.max_bytes:
                    return Download(
                        "too_large",
                        http_status=response.status,
                        error=f"Content-Length {declared} > {self.limits.max_bytes}",
                    )
                body = bytearray()
                async for chunk in response.content.iter_chunked(_CHUNK):
                    body += chunk
                    if len(body) > self.limits.max_bytes:
                        return Download(
                            "too_large",
                            http_status=response.status,
                            error=f"body exceeds {self.limits.max_bytes} bytes",
                        )
                return Download("ok", bytes(body), http_status=response.status)
        except aiohttp.ClientConnectorDNSError as error:
            return Download("dns_error", error=str(error))
        except aiohttp.TooManyRedirects as error:
            return Download("http_error", http_status=error.status, error="too many redirects")
        except aiohttp.InvalidURL as error:
            return Download("invalid_url", error=f"invalid url or redirect target: {error}")
        except TimeoutError as error:  # aiohttp's timeouts subclass TimeoutError
            return Download("timeout", error=str(error) or type(error).__name__)
        except (aiohttp.ClientError, OSError) as error:
            return Download("connection_error", error=f"{type(error).__name__}: {error}")


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.strip().isdigit() else None
