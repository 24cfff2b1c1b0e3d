"""A tiny chat model built offline: a random-weight Qwen2 with a tokenizer trained in memory.

Its replies are noise, but it goes through every step a real model does (tokenizer files,
chat template, safetensors weights, AutoTokenizer/AutoModelForCausalLM, batched generate), so
tests, the demo and the benchmark exercise the real transformers path without a download.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 512

_SUBJECTS = ["The person", "This woman", "This man", "She", "He", "The subject", "They"]
_FEATURES = [
    "has arched eyebrows",
    "has bushy eyebrows",
    "has black hair",
    "has blond hair",
    "has brown hair",
    "has gray hair",
    "has wavy hair",
    "has straight hair",
    "has bangs",
    "has a receding hairline",
    "is bald",
    "has high cheekbones",
    "has rosy cheeks",
    "has an oval face",
    "has a pointy nose",
    "has a big nose",
    "has big lips",
    "has a double chin",
    "has bags under the eyes",
    "has narrow eyes",
    "wears eyeglasses",
    "wears heavy makeup",
    "wears lipstick",
    "wears earrings",
    "wears a hat",
    "wears a necklace",
    "has a mustache",
    "has a goatee",
    "has sideburns",
    "has a beard",
    "has a five o'clock shadow",
    "is smiling",
    "has a slightly open mouth",
    "looks young",
    "looks pale",
    "looks chubby",
]
_CORPUS_EXTRA = [
    "Rewrite these notes about a person's face as one natural description.",
    "Notes: female, young, smiling, wavy brown hair, no beard, eyeglasses.",
    "You describe faces for an image-text dataset.",
    "Write one natural, fluent paragraph of one to three sentences.",
    "Keep every stated fact, add no new ones, never contradict them.",
    "system user assistant",
]


def face_sentences() -> list[str]:
    """A small English corpus about faces: every subject with every feature, and pairs."""
    sentences = [f"{s} {f}." for s in _SUBJECTS for f in _FEATURES]
    sentences += [
        f"{_SUBJECTS[i % len(_SUBJECTS)]} {a} and {b}."
        for i, (a, b) in enumerate(zip(_FEATURES, _FEATURES[1:] + _FEATURES[:1], strict=True))
    ]
    return sentences + _CORPUS_EXTRA


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE over `face_sentences`, wrapped with ChatML's special tokens.

    Normalizer and pre-tokenizer are Qwen2's own: transformers 5 loads a qwen2 folder's
    tokenizer as `Qwen2Tokenizer`, which rebuilds them from vocab and merges whatever
    tokenizer.json says, so training with anything else would tokenize differently after
    loading."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text encodes
        show_progress=False,
    )
    tokenizer.train_from_iterator(face_sentences(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="left",
        model_max_length=2048,
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def build_tiny_qwen2(folder: Path, seed: int = 0) -> Path:
    """Write a tiny Qwen2ForCausalLM chat model folder; the same seed writes the same weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,  # tied random weights greedily repeat the last token
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
