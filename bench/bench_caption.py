"""Caption generation throughput: batch sizes in process, and concurrency against a server.

The same N caption prompts (the default system prompt and template around ~40 words of
notes) go through the transformers backend at batch size 1, 8 and 32, then through the
OpenAI backend at concurrency 1 and 8 against the loopback ChatServer serving the same model
from another process (it batches what arrives together, up to 8). Greedy, at most
`--max-new-tokens` 48. Always the tiny random-weight Qwen2 (its replies are noise but run to
full length, so it measures the machinery); with `--model` also a real HF chat model folder.

    python bench/bench_caption.py [--prompts 64] [--model ~/.facecaption/models/llm/X]
                                  [--write docs/benchmarks.md]
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
from support.tiny_llm import build_tiny_qwen2
from transformers.utils import logging as transformers_logging

from facecaption.caption.rewriters import EMPTY_REPLY, Conversation, Reply, ask
from facecaption.caption.rewriters.in_process import TransformersRewriter
from facecaption.caption.rewriters.openai_server import OpenAIRewriter
from facecaption.settings import CaptionSettings

BATCH_SIZES = (1, 8, 32)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--model", type=Path, help="also a real HF chat model folder")
    parser.add_argument("--write", type=Path, help="write the results as markdown here")
    args = parser.parse_args()
    transformers_logging.disable_progress_bar()

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
