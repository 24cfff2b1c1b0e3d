"""Caption generation throughput: batch sizes in process, and concurrency against a server.

The same N caption prompts (the default system prompt and template around ~40 words of
notes) go through the transformers backend at batch size 1, 8 and 32, then through the
OpenAI backend at concurrency 1 and 8 against the loopback ChatServer serving the same model
from another process (it batches what arrives together, up to 8). Greedy, at most
`--max-new-tokens` 48. Always the tiny random-weight Qwen2 (its replies are noise but run to
full length, so it measures the machinery); with `--model` also a real HF chat model folder.

`--shape` instead measures the caption stage's transformers backend on a Qwen2 of a real
model's shape with random weights, built from a config (no download): `7b` is Qwen2.5-7B's
(28 layers, 3584 wide, GQA 28/4 heads, 152,064-token vocabulary; bfloat16 on a GPU), `small`
a 4-layer, 256-wide one with the same vocabulary (float32 on CPU), `auto` 7b when CUDA is
there, else small. Every reply is exactly `--shape-new-tokens` long (min = max new tokens),
at batch 1, 32 and 128; tokens/s is generated tokens over wall time.

    python bench/bench_caption.py [--prompts 64] [--model ~/.facecaption/models/llm/X]
                                  [--write docs/benchmarks.md]
    python bench/bench_caption.py --shape auto [--shape-new-tokens 64] [--write ...]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import multiprocessing.synchronize
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from benchreport import write_section
from support.chatserver import ChatServer
from support.tiny_llm import build_tiny_qwen2, train_tokenizer
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as transformers_logging

from facecaption.caption.rewriters import EMPTY_REPLY, Conversation, Reply, ask
from facecaption.caption.rewriters.in_process import TransformersRewriter
from facecaption.caption.rewriters.openai_server import OpenAIRewriter
from facecaption.settings import CaptionSettings

BATCH_SIZES = (1, 8, 32)
SHAPE_BATCH_SIZES = (1, 32, 128)
QWEN2_VOCAB = 152_064
SHAPES = {
    # Qwen2.5-7B-Instruct's config.json, weights random
    "7b": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, rope_theta=1_000_000.0,
    ),
    "small": dict(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, rope_theta=1_000_000.0,
    ),
}  # fmt: skip
CONCURRENCIES = (1, 8)
SERVER_BATCH_SIZE = 8

_NOTES = [
    "female", "male", "young", "smiling", "mouth slightly open", "wavy brown hair",
    "straight black hair", "blond hair", "gray hair", "bangs", "receding hairline",
    "arched eyebrows", "bushy eyebrows", "high cheekbones", "rosy cheeks", "oval face",
    "pointy nose", "big lips", "narrow eyes", "bags under the eyes", "wearing eyeglasses",
    "wearing earrings", "wearing lipstick", "heavy makeup", "no beard", "a goatee",
    "a mustache", "five o'clock shadow", "wearing a hat", "double chin",
]  # fmt: skip


def make_prompts(count: int, words: int = 40) -> list[str]:
    """Filled caption prompts whose whole text is about `words` words long."""
    settings = CaptionSettings()
    template_words = len(settings.prompt_template.format(raw_text="").split())
    rng = random.Random(0)
    prompts = []
    for _ in range(count):
        notes: list[str] = []
        while len(", ".join(notes).split()) < words - template_words:
            notes.append(rng.choice([n for n in _NOTES if n not in notes]))
        prompts.append(settings.prompt_template.format(raw_text=", ".join(notes) + "."))
    return prompts


def timed(rewrite: Callable[[list[Conversation]], list[Reply]], prompts: list[str]) -> float:
    conversations = [ask(prompt) for prompt in prompts]
    rewrite(conversations[:2])  # warm up: first-call allocations, connections, kernels
    started = time.perf_counter()
    replies = rewrite(conversations)
    elapsed = time.perf_counter() - started
    # random weights may say nothing (empty_reply); anything else is a failed request
    failed = [reply.error for reply in replies if reply.error not in (None, EMPTY_REPLY)]
    assert not failed, f"some prompts failed: {failed[:3]}"
    return elapsed


def _serve(
    folder: Path,
    max_new_tokens: int,
    address: multiprocessing.Queue,
    stop: multiprocessing.synchronize.Event,
) -> None:
    transformers_logging.disable_progress_bar()
    with ChatServer(
        model_dir=folder, max_new_tokens=max_new_tokens, batch_size=SERVER_BATCH_SIZE
    ) as server:
        address.put(server.base_url)
        stop.wait()


@contextlib.contextmanager
def served(folder: Path, max_new_tokens: int) -> Iterator[str]:
    """A ChatServer for the model in its own process, as a model server would be: torch in
    two threads of one process (client's and server's) slows both on a small machine."""
    context = multiprocessing.get_context("spawn")
    address, stop = context.Queue(), context.Event()
    process = context.Process(target=_serve, args=(folder, max_new_tokens, address, stop))
    process.start()
    try:
        yield address.get(timeout=120)
    finally:
        stop.set()
        process.join()


def bench_model(folder: Path, prompts: list[str], max_new_tokens: int) -> list[tuple]:
    settings = CaptionSettings()
    options = dict(
        system_prompt=settings.system_prompt,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        top_p=1.0,
        seed=0,
    )
    rows = []
    for batch_size in BATCH_SIZES:
        rewriter = TransformersRewriter(folder, batch_size=batch_size, **options)
        elapsed = timed(rewriter.rewrite, prompts)
        tokens = sum(rewriter.last_token_counts)
        rows.append((folder.name, f"transformers, batch {batch_size}", elapsed, tokens))
    with served(folder, max_new_tokens) as base_url:
        for concurrency in CONCURRENCIES:
            client = OpenAIRewriter(
                base_url,
                folder.name,
                api_key=None,
                concurrency=concurrency,
                timeout_s=600,
                retries=0,
                max_reply_bytes=settings.max_reply_bytes,
                **options,
            )
            elapsed = timed(client.rewrite, prompts)
            tokens = sum(client.last_token_counts)
            name = (
                f"openai -> ChatServer (batches <= {SERVER_BATCH_SIZE}), concurrency {concurrency}"
            )
            rows.append((folder.name, name, elapsed, tokens))
    return rows


def build_shaped_qwen2(folder: Path, shape: str, new_tokens: int, device: torch.device) -> dict:
    """A random Qwen2 of `shape` saved as a chat model folder whose replies are always
    `new_tokens` long; returns its size."""
    tokenizer = train_tokenizer()
    config = Qwen2Config(
        **SHAPES[shape],
        vocab_size=QWEN2_VOCAB,  # the tokenizer uses the first ids only; the compute is real
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    default_dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)  # built in place: a 7B model in float32 is 30 GB
        with torch.device(device):
            model = Qwen2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.min_new_tokens = new_tokens  # no early end of sequence
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    size = {"params_b": sum(p.numel() for p in model.parameters()) / 1e9, "dtype": str(dtype)}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return size


def bench_shape(shape: str, new_tokens: int, write: Path | None) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if shape == "auto":
        shape = "7b" if device.type == "cuda" else "small"
    settings = CaptionSettings()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / f"qwen2-{shape}-random"
        started = time.perf_counter()
        size = build_shaped_qwen2(folder, shape, new_tokens, device)
        print(f"built {folder.name} in {time.perf_counter() - started:.0f} s: {size}", flush=True)
        rewriter = TransformersRewriter(
            folder,
            model_id=folder.name,
            system_prompt=settings.system_prompt,
            max_new_tokens=new_tokens,
            temperature=0.0,
            top_p=1.0,
            seed=0,
            batch_size=1,
            device=device,
        )
        for batch_size in SHAPE_BATCH_SIZES:
            rewriter.batch_size = batch_size
            prompts = make_prompts(max(8, 2 * batch_size))  # two full batches (8 at batch 1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = timed(rewriter.rewrite, prompts)
            tokens = sum(rewriter.last_token_counts)
            assert tokens == len(prompts) * new_tokens, "replies were not of fixed length"
            rows.append((batch_size, len(prompts), elapsed, tokens))
            print(f"batch {batch_size}: {tokens / elapsed:.0f} tokens/s", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [
        f"Qwen2 of the {shape} shape with random weights ({size['params_b']:.2f} B parameters,"
        f" {size['dtype'].removeprefix('torch.')}), the caption stage's transformers backend"
        f" (TransformersRewriter: chat template, left padding, batched greedy `generate`), every"
        f" reply exactly {new_tokens} new tokens; prompts of about 40 words plus the default"
        f" system prompt, two full batches per size (8 prompts at batch 1). {name},"
        f" {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__},"
        f" Python {platform.python_version()}.",
        "",
        "| batch | prompts | seconds | generated tokens/s | captions/s | vs batch 1 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    baseline = rows[0][3] / rows[0][2]
    for batch_size, count, elapsed, tokens in rows:
        rate = tokens / elapsed
        lines.append(
            f"| {batch_size} | {count} | {elapsed:.2f} | {rate:.0f} | {count / elapsed:.2f} |"
            f" {rate / baseline:.1f}x |"
        )
    print("\n".join(lines))
    if write:
        command = f"python bench/bench_caption.py --shape {shape} --shape-new-tokens {new_tokens}"
        title = (
            "Caption generation, Qwen2 7B shape"
            if shape == "7b"
            else ("Caption generation, small Qwen2 shape")
        )
        write_section(write, title, command, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--model", type=Path, help="also a real HF chat model folder")
    parser.add_argument(
        "--shape",
        choices=["auto", "small", "7b"],
        help="instead: a random Qwen2 of this shape at batch 1/32/128 (auto: 7b on a GPU)",
    )
    parser.add_argument("--shape-new-tokens", type=int, default=64)
    parser.add_argument("--write", type=Path, help="write the results as markdown here")
    args = parser.parse_args()
    transformers_logging.disable_progress_bar()
    if args.shape:
        bench_shape(args.shape, args.shape_new_tokens, args.write)
        return

    prompts = make_prompts(args.prompts)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        tiny = build_tiny_qwen2(Path(scratch) / "tiny-qwen2")
        rows += bench_model(tiny, prompts, args.max_new_tokens)
    if args.model:
        rows += bench_model(args.model.expanduser(), prompts, args.max_new_tokens)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    mean_words = sum(len(p.split()) for p in prompts) / len(prompts)
    lines = [
        f"{args.prompts} caption prompts of {mean_words:.0f} words (+ the default system"
        f" prompt), greedy, at most {args.max_new_tokens} new tokens; tiny-qwen2 is a 2-layer,"
        f" 64-wide random Qwen2 (noise, full-length replies: it measures the machinery)."
        f" {device}, {platform.machine()}, {os.cpu_count()} cores,"
        f" {torch.get_num_threads()} torch threads, torch {torch.__version__},"
        f" Python {platform.python_version()}.",
        "",
        "| model | backend | seconds | captions/s | generated tokens/s | vs batch 1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    baseline: dict[str, float] = {}
    for model, backend, elapsed, tokens in rows:
        rate = args.prompts / elapsed
        baseline.setdefault(model, rate)
        lines.append(
            f"| {model} | {backend} | {elapsed:.2f} | {rate:.1f} | {tokens / elapsed:.0f} |"
            f" {rate / baseline[model]:.1f}x |"
        )
    print("\n".join(lines))
    if args.write:
        command = ["python bench/bench_caption.py", f"--prompts {args.prompts}"]
        if args.max_new_tokens != 48:
            command.append(f"--max-new-tokens {args.max_new_tokens}")
        if args.model:
            command.append(f"--model {args.model}")
        write_section(args.write, "Caption generation", " ".join(command), lines)


if __name__ == "__main__":
    main()
