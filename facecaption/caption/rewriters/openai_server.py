"""The server rewrite backend: any OpenAI-compatible `/v1/chat/completions` endpoint.

One request per prompt, at most `concurrency` in flight (servers such as vLLM batch them).
Each attempt has its own deadline. 429 (waiting out its Retry-After when given), 5xx,
timeouts and connection failures are retried with exponential backoff and jitter; any other
answer is final. A prompt whose requests finally fail gets None, and why is kept in
`last_errors`; the program's own faults (a bad URL scheme, say) still raise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass

import aiohttp

from facecaption.models.identity import served_llm_identity

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 8.0
RETRY_AFTER_MAX_S = 60.0  # a longer Retry-After is capped: the run goes on, or fails the row


class RetryableError(Exception):
    """An attempt failed in a way that a later attempt may not."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class FinalError(Exception):
    """The server answered, and asking again would get the same answer."""


@dataclass(frozen=True)
class Completion:
    text: str | None
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
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.model_id = model_id or served_llm_identity(model)
        self.last_errors: dict[int, str] = {}  # prompt index -> why it got None, last call
        self.last_token_counts: list[int] = []  # the server's completion_tokens, last call
        self.generated_tokens = 0  # all calls

    def rewrite(self, prompts: list[str]) -> list[str | None]:
        return asyncio.run(self.rewrite_async(prompts))

    async def rewrite_async(self, prompts: list[str]) -> list[str | None]:
        self.last_errors = {}
        slots = asyncio.Semaphore(self.concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            completions = await asyncio.gather(
                *(self._complete(session, slots, index, p) for index, p in enumerate(prompts))
            )
        if self.last_errors:
            index, reason = next(iter(sorted(self.last_errors.items())))
            log.warning(
                "%d of %d prompts got no reply from %s; prompt %d: %s",
                len(self.last_errors), len(prompts), self.base_url, index, reason,
            )  # fmt: skip
        self.last_token_counts = [c.completion_tokens for c in completions]
        self.generated_tokens += sum(self.last_token_counts)
        return [c.text for c in completions]

    def request_body(self, prompt: str) -> dict:
        return {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": prompt},
            ],
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }

    async def _complete(
        self, session: aiohttp.ClientSession, slots: asyncio.Semaphore, index: int, prompt: str
    ) -> Completion:
        body = self.request_body(prompt)
        # Backoff waits keep the slot: a server that asks us to slow down gets fewer requests.
        async with slots:
            for attempt in range(self.retries + 1):
                try:
                    completion = await self._attempt(session, body)
                except FinalError as error:
                    self.last_errors[index] = str(error)
                    return Completion(None)
                except RetryableError as error:
                    self.last_errors[index] = f"{error} (attempt {attempt + 1})"
                    if attempt < self.retries:
                        await asyncio.sleep(_backoff_s(attempt, error.retry_after_s))
                else:
                    self.last_errors.pop(index, None)
                    return completion
        return Completion(None)

    async def _attempt(self, session: aiohttp.ClientSession, body: dict) -> Completion:
        url = f"{self.base_url}/chat/completions"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with session.post(url, json=body, timeout=timeout) as response:
                if response.status in RETRY_STATUSES:
                    raise RetryableError(
                        f"HTTP {response.status}",
                        _retry_after_s(response.headers.get("Retry-After")),
                    )
                if response.status >= 400:
                    detail = (await response.text())[:200]
                    raise FinalError(f"HTTP {response.status}: {detail}")
                text = await response.text()
        except TimeoutError as error:
            raise RetryableError(f"no answer within {self.timeout_s:g} s") from error
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
            raise RetryableError(f"connection failed: {error!r}") from error
        try:
            reply = json.loads(text)
        except ValueError as error:
            raise FinalError(f"the reply is not JSON: {text[:200]!r}") from error
        return _completion(reply)


def _completion(reply: object) -> Completion:
    if not isinstance(reply, dict):
        raise FinalError("the reply is not a JSON object")
    choices = reply.get("choices") or []
    if not choices:
        raise FinalError("the reply has no choices")
    content = (choices[0].get("message") or {}).get("content")
    if not isinstance(content, str):
        raise FinalError("the reply's first choice has no text")
    usage = reply.get("usage") or {}
    return Completion(content.strip(), int(usage.get("completion_tokens") or 0))


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
