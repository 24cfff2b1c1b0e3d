"""The in-process rewrite backend: a local Hugging Face chat model, batched `generate`.

Reads the folder only (`local_files_only`), runs on CUDA in bfloat16 (float16 where bf16 is
unsupported) when a GPU is there, else float32 on CPU. Prompts are padded on the left so every
row of a batch ends where generation starts; with greedy decoding a prompt's reply does not
depend on the batch it lands in. Sampling is seeded at each `rewrite` call (the settings' seed
plus the attempt), on a forked RNG so the process's own random state is left alone. A reply
with no text is `Reply(None, EMPTY_REPLY)`; the caption stage caps the length of the others,
as for the server backend.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from facecaption.caption.rewriters import EMPTY_REPLY, Conversation, Reply, ask
from facecaption.models.identity import transformers_llm_identity


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype_for(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class TransformersRewriter:
    def __init__(
        self,
        model_dir: Path,
        *,
        model_id: str | None = None,
        system_prompt: str,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        batch_size: int,
        device: str | torch.device | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.system_prompt = system_prompt
        self.seed = seed
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else _default_device()
        self.model_id = model_id or transformers_llm_identity(self.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, local_files_only=True, dtype=_dtype_for(self.device)
        ).to(self.device)
        self.model.eval()
        self.generation_config = self._generation_config(max_new_tokens, temperature, top_p)
        self.last_token_counts: list[int] = []  # new tokens per prompt of the last call
        self.generated_tokens = 0  # all calls

    def _generation_config(
        self, max_new_tokens: int, temperature: float, top_p: float
    ) -> GenerationConfig:
        # The model's own defaults (top_k, repetition_penalty, eos ids) stay; ours override.
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = max_new_tokens
        config.max_length = None
        config.pad_token_id = self.tokenizer.pad_token_id
        if config.eos_token_id is None:
            config.eos_token_id = self.tokenizer.eos_token_id
        config.do_sample = temperature > 0
        if config.do_sample:
            config.temperature, config.top_p = temperature, top_p
        else:  # sampling knobs would only draw warnings
            config.temperature = config.top_p = config.top_k = None
        return config

    def messages(self, conversation: Conversation | str) -> list[dict[str, str]]:
        """The system prompt, then the conversation (a lone prompt is one user turn)."""
        turns = ask(conversation) if isinstance(conversation, str) else conversation
        return [{"role": "system", "content": self.system_prompt}, *turns]

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        """The text the model sees for a conversation, ending where its reply starts."""
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def rewrite(self, conversations: list[Conversation], *, attempt: int = 0) -> list[Reply]:
        texts = self.complete([self.messages(c) for c in conversations], seed=self.seed + attempt)
        return [
            Reply(text, completion_tokens=tokens) if text else Reply(None, EMPTY_REPLY)
            for text, tokens in zip(texts, self.last_token_counts, strict=True)
        ]

    def complete(
        self, conversations: list[list[dict[str, str]]], *, seed: int | None = None
    ) -> list[str]:
        """The model's reply to each conversation (system prompt included), `batch_size` of
        them per `generate`, sampling seeded with `seed` (default: the rewriter's)."""
        replies: list[str] = []
        self.last_token_counts = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(self.seed if seed is None else seed)
            for start in range(0, len(conversations), self.batch_size):
                replies += self._generate(conversations[start : start + self.batch_size])
        self.generated_tokens += sum(self.last_token_counts)
        return replies

    def _generate(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        texts = [self.chat_text(messages) for messages in conversations]
        # The chat template already holds every special token the model expects.
        batch = self.tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=False
        ).to(self.device)
        output = self.model.generate(**batch, generation_config=self.generation_config)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        stop_ids = _as_list(self.generation_config.eos_token_id) + [self.tokenizer.pad_token_id]
        self.last_token_counts += [_reply_length(row, stop_ids) for row in new_tokens.tolist()]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]


def _as_list(ids: int | list[int] | None) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def _reply_length(row: list[int], stop_ids: list[int]) -> int:
    """Generated tokens up to and including the first stop token (the rest is padding)."""
    for index, token in enumerate(row):
        if token in stop_ids:
            return index + 1
    return len(row)
