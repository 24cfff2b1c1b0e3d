"""The server rewrite backend: any OpenAI-compatible `/v1/chat/completions` endpoint.

One request per conversation, at most `concurrency` in flight (servers such as vLLM batch
them). Each attempt has one deadline (`timeout_s`) for everything: connecting, sending, and
reading the whole reply, so a server that trickles bytes cannot hold a face longer; the body
is read under a byte cap (`max_reply_bytes`): reading stops there and the reply is refused,
so a 30 MB answer costs at most the cap; compressed replies are not inflated (we ask for
none, and a gzip body is then not UTF-8 JSON). Redirects are not followed.

429 (waiting out its Retry-After when given), 5xx, timeouts, connection failures and malformed
HTTP are retried with exponential backoff and jitter: they may not happen again. Any other
answer is final: asking again would get the same one. The reply is then parsed at the
boundary (`parse_completion`): UTF-8, JSON, an object with
`choices[0].message.content` a non-empty string and, if present, `usage` an object whose
`completion_tokens` is a non-negative integer. Anything else becomes a typed reason (see
`facecaption.caption.rewriters`) on that face's `Reply`; nothing here raises for a reply.
Reasons and details never carry the server's URL (it is internal; captions.parquet stores the
reason).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from dataclasses import dataclass

import aiohttp
import yarl

from facecaption.caption.rewriters import (
    BAD_HTTP,
    BAD_SHAPE,
    CONNECTION_ERROR,
    EMPTY_REPLY,
    HTTP_ERROR,
    NOT_JSON,
    NOT_UTF8,
    REPLY_TOO_LARGE,
    SERVER_ERROR,
    TIMEOUT,
    Conversation,
    Reply,
)
from facecaption.core.errors import SettingsError
from facecaption.core.redaction import redact_url
from facecaption.models.identity import served_llm_identity

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 8.0
RETRY_AFTER_MAX_S = 60.0  # a longer Retry-After is capped: the run goes on, or fails the row
READ_CHUNK_BYTES = 65_536


class ReplyError(Exception):
    """An attempt that gave no usable reply, with its typed reason."""

    retryable = False

    def __init__(self, reason: str, detail: str, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry_after_s = retry_after_s


class RetryableError(ReplyError):
    """An attempt failed in a way that a later attempt may not."""

    retryable = True


class FinalError(ReplyError):
    """The server answered, and asking again would get the same answer."""


@dataclass(frozen=True)
class Completion:
    text: str
    completion_tokens: int = 0


class OpenAIRewriter:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        model_id: str | None = None,
        api_key: str | None,
        system_prompt: str,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        concurrency: int,
        timeout_s: float,
        retries: int,
        max_reply_bytes: int,
    ) -> None:
        url = yarl.URL(base_url)
        if url.user is not None and api_key:
            raise SettingsError(
                "caption.base_url has credentials in it and an API key is set: give one"
            )
        # credentials in the URL become Basic auth; the URL itself is kept without them
        self.authorization = f"Bearer {api_key}" if api_key else None
        if url.user is not None:
            pair = f"{url.user}:{url.password or ''}".encode()
            self.authorization = f"Basic {base64.b64encode(pair).decode()}"
        self.base_url = str(url.with_user(None)).rstrip("/")
        self.model = model
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_reply_bytes = max_reply_bytes
        self.model_id = model_id or served_llm_identity(model)
        self.last_token_counts: list[int] = []  # the server's completion_tokens, last call
        self.generated_tokens = 0  # all calls

    def rewrite(self, conversations: list[Conversation], *, attempt: int = 0) -> list[Reply]:
        return asyncio.run(self.rewrite_async(conversations, attempt=attempt))

    async def rewrite_async(
        self, conversations: list[Conversation], *, attempt: int = 0
    ) -> list[Reply]:
        slots = asyncio.Semaphore(self.concurrency)
        # identity: a compressed reply would pass the byte cap before it is inflated
        headers = {"Accept-Encoding": "identity"}
        if self.authorization:
            headers["Authorization"] = self.authorization
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),  # the one deadline is `_attempt`'s
        ) as session:
            replies = await asyncio.gather(
                *(self._reply(session, slots, self.request_body(c, attempt)) for c in conversations)
            )
        failed = [(index, r) for index, r in enumerate(replies) if r.text is None]
        if failed:
            index, reply = failed[0]
            log.warning(
                "%d of %d requests got no usable reply from %s; request %d: %s (%s)",
                len(failed), len(replies), redact_url(self.base_url), index, reply.error,
                reply.detail,
            )  # fmt: skip
        self.last_token_counts = [reply.completion_tokens for reply in replies]
        self.generated_tokens += sum(self.last_token_counts)
        return replies

    def request_body(self, conversation: Conversation, attempt: int = 0) -> dict:
        return {
            "model": self.model,
            "messages": [{"role": "system", "content": self.system_prompt}, *conversation],
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed + attempt,
        }

    async def _reply(
        self, session: aiohttp.ClientSession, slots: asyncio.Semaphore, body: dict
    ) -> Reply:
        # Backoff waits keep the slot: a server that asks us to slow down gets fewer requests.
        async with slots:
            for attempt in range(self.retries + 1):
                try:
                    completion = await self._attempt(session, body)
                except ReplyError as error:
                    detail = f"{error} (attempt {attempt + 1})"
                    if not error.retryable or attempt == self.retries:
                        return Reply(None, error.reason, detail)
                    await asyncio.sleep(_backoff_s(attempt, error.retry_after_s))
                else:
                    return Reply(completion.text, completion_tokens=completion.completion_tokens)
        raise AssertionError("unreachable: the last attempt returns")

    async def _attempt(self, session: aiohttp.ClientSession, body: dict) -> Completion:
        url = f"{self.base_url}/chat/completions"
        try:
            async with asyncio.timeout(self.timeout_s):
                async with session.post(url, json=body, allow_redirects=False) as response:
                    if response.status in RETRY_STATUSES:
                        raise RetryableError(
                            SERVER_ERROR,
                            f"HTTP {response.status}",
                            _retry_after_s(response.headers.get("Retry-After")),
                        )
                    if response.status != 200:
                        raise FinalError(HTTP_ERROR, f"HTTP {response.status}")
                    raw = await read_capped(response, self.max_reply_bytes)
        except TimeoutError as error:
            raise RetryableError(TIMEOUT, f"no whole reply within {self.timeout_s:g} s") from error
        except aiohttp.ClientResponseError as error:  # the HTTP parser refused the answer
            raise RetryableError(BAD_HTTP, f"{type(error).__name__}: {error.message}") from error
        except aiohttp.ClientPayloadError as error:  # bad chunking or compression, cut body
            raise RetryableError(BAD_HTTP, type(error).__name__) from error
        except aiohttp.ClientError as error:  # refused, reset, disconnected
            raise RetryableError(CONNECTION_ERROR, type(error).__name__) from error
        return parse_completion(raw)


async def read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The whole body, or FinalError(REPLY_TOO_LARGE) as soon as it passes `max_bytes`."""
    declared = response.content_length
    if declared is not None and declared > max_bytes:
        raise FinalError(REPLY_TOO_LARGE, f"Content-Length {declared} over {max_bytes} bytes")
    body = bytearray()
    async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
        body += chunk
        if len(body) > max_bytes:
            raise FinalError(REPLY_TOO_LARGE, f"over {max_bytes} bytes")
    return bytes(body)


def parse_completion(raw: bytes) -> Completion:
    """An OpenAI chat completion's first reply, or FinalError with the typed reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FinalError(NOT_UTF8, f"invalid UTF-8 at byte {error.start}") from error
    try:
        reply = json.loads(text)
    except (ValueError, RecursionError) as error:  # RecursionError: nesting too deep
        raise FinalError(NOT_JSON, f"not JSON: {text[:80]!r}") from error
    if not isinstance(reply, dict):
        raise FinalError(BAD_SHAPE, f"a JSON {type(reply).__name__}, not an object")
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise FinalError(BAD_SHAPE, f"choices is {_shape(choices)}, not a list of objects")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise FinalError(BAD_SHAPE, f"choices[0].message is {_shape(message)}")
    content = message.get("content")
    if not isinstance(content, str):
        raise FinalError(BAD_SHAPE, f"choices[0].message.content is {_shape(content)}")
    tokens = _completion_tokens(reply.get("usage"))
    try:
        content.encode("utf-8")  # a \ud800 escape decodes to a lone surrogate: not text
    except UnicodeEncodeError as error:
        raise FinalError(NOT_UTF8, "content has a lone surrogate escape") from error
    if not content.strip():
        raise FinalError(EMPTY_REPLY, "content is empty")
    return Completion(content.strip(), tokens)


def _completion_tokens(usage: object) -> int:
    """`usage.completion_tokens` when the server sent it (absent or null: 0)."""
    if usage is None:
        return 0
    if not isinstance(usage, dict):
        raise FinalError(BAD_SHAPE, f"usage is {_shape(usage)}")
    tokens = usage.get("completion_tokens")
    if tokens is None:
        return 0
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise FinalError(BAD_SHAPE, f"usage.completion_tokens is {_shape(tokens)}")
    return tokens


def _shape(value: object) -> str:
    """What a JSON value is, for a detail message (short, never the whole value)."""
    if isinstance(value, list | dict | str):
        return f"a {type(value).__name__} of length {len(value)}"
    return "null" if value is None else f"{type(value).__name__} {str(value)[:20]}"


def _backoff_s(attempt: int, retry_after_s: float | None) -> float:
    if retry_after_s is not None:
        return min(retry_after_s, RETRY_AFTER_MAX_S)
    delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt)
    return random.uniform(delay / 2, delay)  # jitter: retries of many prompts spread out


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds; the HTTP-date form is rare from model servers and is ignored."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
