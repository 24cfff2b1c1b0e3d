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
from pathlib import Path
from typing import Protocol

from facecaption.models.detector import ModelNotFoundError
from facecaption.settings import CaptionSettings


class Rewriter(Protocol):
    model_id: str  # what produced the replies: model name and weights digest, or server

    def rewrite(self, prompts: list[str]) -> list[str | None]:
        """One reply per prompt, in order; None where that prompt's request finally failed."""
        ...


def configured_folder(settings: CaptionSettings, models_dir: Path) -> Path:
    """Where the settings say the transformers model is: `model_path`, else the cache."""
    if settings.model_path:
        return Path(settings.model_path).expanduser()
    return Path(models_dir).expanduser() / "llm" / settings.model


def model_folder(settings: CaptionSettings, models_dir: Path) -> Path:
    """The transformers model folder the settings name, or a ModelNotFoundError saying how
    to get one."""
    folder = configured_folder(settings, models_dir)
    if settings.model_path:
        where = f"FACECAPTION_CAPTION__MODEL_PATH names {folder}"
    else:
        where = f"caption model {settings.model!r} is not in the model cache: {folder}"
    if not (folder / "config.json").is_file():
        qwen = folder.name.lower().startswith("qwen")
        hub_name = folder.name if qwen else "Qwen2.5-1.5B-Instruct"
        raise ModelNotFoundError(
            f"{where}, which holds no Hugging Face model (no config.json). On a machine with"
            f" internet: `huggingface-cli download Qwen/{hub_name} --local-dir {folder}`"
            f" (any chat model in HF format works), then copy the folder here; or set"
            f" caption.backend = 'openai' with a base_url, or 'template' for no LLM."
        )
    return folder


def load_rewriter(settings: CaptionSettings, models_dir: Path) -> Rewriter:
    if settings.backend == "transformers":
        from facecaption.llm.transformers_backend import TransformersRewriter

        return TransformersRewriter(
            model_folder(settings, models_dir),
            system_prompt=settings.system_prompt,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed,
            batch_size=settings.batch_size,
        )
    if settings.backend == "openai":
        if not settings.base_url:
            raise ValueError(
                "caption.backend = 'openai' needs caption.base_url, the server's API root,"
                " e.g. FACECAPTION_CAPTION__BASE_URL=http://127.0.0.1:8000/v1"
            )
        from facecaption.llm.openai_backend import OpenAIRewriter

        return OpenAIRewriter(
            settings.base_url,
            settings.server_model or settings.model,
            api_key=os.environ.get(settings.api_key_env),
            system_prompt=settings.system_prompt,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed,
            concurrency=settings.concurrency,
            timeout_s=settings.timeout_s,
            retries=settings.retries,
        )
    raise ValueError(f"caption.backend = {settings.backend!r} uses no LLM")
