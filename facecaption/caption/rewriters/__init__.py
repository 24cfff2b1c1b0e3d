"""LLM rewrite backends: one small interface, an in-process and a server backend.

A `Rewriter` turns user prompts (the caption prompt template already filled in) into one reply
each; it owns the system prompt and the chat format. `load_rewriter` picks the backend the
caption settings name:

  transformers  a Hugging Face chat model folder, run in this process (CUDA when available)
  openai        any OpenAI-compatible `/v1/chat/completions` server (vLLM, TGI, llama.cpp, ...)

Nothing is downloaded here: the transformers backend reads a local folder only.
"""

from __future__ import annotations

import os
from typing import Protocol

from facecaption.core.errors import SettingsError
from facecaption.models.identity import served_llm_identity, transformers_llm_identity
from facecaption.models.locate import llm_folder
from facecaption.settings import Settings


class Rewriter(Protocol):
    model_id: str  # what produced the replies (`facecaption.models.identity`)

    def rewrite(self, prompts: list[str]) -> list[str | None]:
        """One reply per prompt, in order; None where that prompt's request finally failed."""
        ...


def load_rewriter(settings: Settings) -> Rewriter:
    caption = settings.caption
    if caption.backend == "transformers":
        from facecaption.caption.rewriters.in_process import TransformersRewriter

        folder = llm_folder(settings)
        return TransformersRewriter(
            folder,
            model_id=transformers_llm_identity(folder),
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

        served = caption.server_model or caption.model
        return OpenAIRewriter(
            caption.base_url,
            served,
            model_id=served_llm_identity(served),
            api_key=os.environ.get(caption.api_key_env),
            system_prompt=caption.system_prompt,
            max_new_tokens=caption.max_new_tokens,
            temperature=caption.temperature,
            top_p=caption.top_p,
            seed=caption.seed,
            concurrency=caption.concurrency,
            timeout_s=caption.timeout_s,
            retries=caption.retries,
        )
    raise SettingsError(f"caption.backend = {caption.backend!r} uses no LLM")
