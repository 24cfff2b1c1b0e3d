"""LLM rewrite backends: one small interface, an in-process and a server backend.

A `Rewriter` turns conversations (the user's turns, and the model's earlier replies when a
face is asked again) into one `Reply` each; it owns the system prompt and the chat format.
`load_rewriter` picks the backend the caption settings name:

  transformers  a Hugging Face chat model folder, run in this process (CUDA when available)
  openai        any OpenAI-compatible `/v1/chat/completions` server (vLLM, TGI, llama.cpp, ...)

A reply is the model's: a face whose request fails or whose answer is not a usable reply gets
`Reply(None, reason)` with one of the typed reasons below (recorded per face in
captions.parquet as `rewrite_error`); the backend never raises for it. The program's own
faults (a bad URL scheme in the settings, a model that will not load) still raise.

Nothing is downloaded here: the transformers backend reads a local folder only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from facecaption.core.errors import SettingsError
from facecaption.models.identity import caption_identity
from facecaption.models.locate import llm_folder
from facecaption.settings import Settings

# Why a face got no usable reply. Request faults (after the server backend's retries) ...
TIMEOUT = "timeout"  # no whole reply within the deadline
CONNECTION_ERROR = "connection_error"  # refused, reset, closed before answering
BAD_HTTP = "bad_http"  # malformed HTTP: status line, headers, chunking, a body cut short
SERVER_ERROR = "server_error"  # 429 or 5xx on every attempt
HTTP_ERROR = "http_error"  # any other answer but 200 (4xx, a redirect: never followed)
# ... and replies that are not an OpenAI chat completion we can use.
REPLY_TOO_LARGE = "reply_too_large"  # over caption.max_reply_bytes: reading stopped there
NOT_UTF8 = "not_utf8"  # bytes (or \u escapes) that are not UTF-8 text
NOT_JSON = "not_json"  # e.g. an HTML error page served with 200
BAD_SHAPE = "bad_shape"  # JSON, but not {"choices": [{"message": {"content": str}}], ...}
EMPTY_REPLY = "empty_reply"  # content with no text in it

# The request faults a later run may not meet: the stage counts them as `retryable`, so a
# refresh (`run --retry-transient`) runs the stage again.
TRANSIENT_ERRORS = frozenset({TIMEOUT, CONNECTION_ERROR, BAD_HTTP, SERVER_ERROR})

Conversation = list[dict[str, str]]  # {"role": "user"|"assistant", "content": ...} turns


def ask(prompt: str) -> Conversation:
    """A conversation of one user turn."""
    return [{"role": "user", "content": prompt}]


@dataclass(frozen=True)
class Reply:
    text: str | None  # the model's reply, stripped; None when there is none to use
    error: str | None = None  # one of the reasons above when text is None
    detail: str | None = None  # for logs: what exactly went wrong (never in an artifact)
    completion_tokens: int = 0


class Rewriter(Protocol):
    model_id: str  # what produced the replies (`facecaption.models.identity.caption_identity`)

    def rewrite(self, conversations: list[Conversation], *, attempt: int = 0) -> list[Reply]:
        """One reply per conversation, in order. `attempt` (0 first, 1 for a retry) is added
        to the seed, so a retry samples differently as well as asking differently."""
        ...


def load_rewriter(settings: Settings) -> Rewriter:
    caption = settings.caption
    if caption.backend == "transformers":
        from facecaption.caption.rewriters.in_process import TransformersRewriter

        return TransformersRewriter(
            llm_folder(settings),
            model_id=caption_identity(settings),
            system_prompt=caption.system_prompt,
            max_new_tokens=caption.max_new_tokens,
            temperature=caption.temperature,
            top_p=caption.top_p,
            seed=caption.seed,
            batch_size=caption.batch_size,
        )
    if caption.backend == "openai":
        if not caption.base_url:
            raise SettingsError(
                "caption.backend = 'openai' needs caption.base_url, the server's API root,"
                " e.g. FACECAPTION_CAPTION__BASE_URL=http://127.0.0.1:8000/v1"
            )
        from facecaption.caption.rewriters.openai_server import OpenAIRewriter

        return OpenAIRewriter(
            caption.base_url,
            caption.server_model or caption.model,
            model_id=caption_identity(settings),
            api_key=os.environ.get(caption.api_key_env),
            system_prompt=caption.system_prompt,
            max_new_tokens=caption.max_new_tokens,
            temperature=caption.temperature,
            top_p=caption.top_p,
            seed=caption.seed,
            concurrency=caption.concurrency,
            timeout_s=caption.timeout_s,
            retries=caption.retries,
            max_reply_bytes=caption.max_reply_bytes,
        )
    raise SettingsError(f"caption.backend = {caption.backend!r} uses no LLM")
