"""The LLM rewrite backends: a tiny real model through transformers, and the OpenAI client
against a loopback chat server with scripted replies, faults, or that model behind it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.chatserver import ChatServer, Fault, first_requests
from support.tiny_llm import build_tiny_qwen2

from facecaption.caption.rewriters import BAD_SHAPE, HTTP_ERROR, TIMEOUT, ask, load_rewriter
from facecaption.caption.rewriters.in_process import TransformersRewriter
from facecaption.caption.rewriters.openai_server import OpenAIRewriter
from facecaption.models.errors import ModelNotFoundError
from facecaption.models.identity import caption_identity, digest_cache_file
from facecaption.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "You describe faces."
PROMPTS = [
    "Notes: female, young, smiling.",
    "Notes: male, bald, eyeglasses, a goatee and bushy eyebrows, looking slightly to the left.",
    "Notes: wavy brown hair.",
    "Notes: rosy cheeks, high cheekbones, heavy makeup, lipstick and earrings.",
    "Notes: gray hair, bags under the eyes.",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("llm") / "tiny-qwen2")


def tiny_rewriter(folder: Path, **overrides: object) -> TransformersRewriter:
    options: dict = dict(
        system_prompt=SYSTEM, max_new_tokens=12, temperature=0.0, top_p=1.0, seed=0, batch_size=5
    )
    return TransformersRewriter(folder, **{**options, **overrides})


def client(base_url: str, **overrides: object) -> OpenAIRewriter:
    options: dict = dict(
        api_key=None,
        system_prompt=SYSTEM,
        max_new_tokens=12,
        temperature=0.0,
        top_p=1.0,
        seed=0,
        concurrency=4,
        timeout_s=5.0,
        retries=2,
        max_reply_bytes=1_000_000,
    )
    return OpenAIRewriter(base_url, "tiny", **{**options, **overrides})


def texts(rewriter: TransformersRewriter | OpenAIRewriter, prompts: list[str]) -> list[str | None]:
    """The reply texts to one-turn conversations."""
    return [reply.text for reply in rewriter.rewrite([ask(prompt) for prompt in prompts])]


def echo(messages: list[dict[str, str]]) -> str:
    return f"caption of {messages[-1]['content']}"


# -- transformers ------------------------------------------------------------------------


def test_tiny_model_rewrites_a_left_padded_batch(tiny_model: Path) -> None:
    rewriter = tiny_rewriter(tiny_model)
    replies = rewriter.rewrite([ask(prompt) for prompt in PROMPTS])
    assert len(replies) == 5
    assert all(r.text or r.error == "empty_reply" for r in replies)
    assert any(r.text for r in replies)  # random weights write noise, but they write
    assert all(1 <= count <= 12 for count in rewriter.last_token_counts)
    assert rewriter.model_id.startswith("tiny-qwen2@sha256:")
    batch = rewriter.tokenizer(
        [rewriter.chat_text(rewriter.messages(p)) for p in PROMPTS[:2]], padding=True
    )
    pad = rewriter.tokenizer.pad_token_id
    assert batch["input_ids"][0][0] == pad and batch["input_ids"][0][-1] != pad


def test_same_seed_samples_the_same_replies(tiny_model: Path) -> None:
    first = texts(tiny_rewriter(tiny_model, temperature=0.8, top_p=0.95, seed=7), PROMPTS)
    again = texts(tiny_rewriter(tiny_model, temperature=0.8, top_p=0.95, seed=7), PROMPTS)
    other = texts(tiny_rewriter(tiny_model, temperature=0.8, top_p=0.95, seed=8), PROMPTS)
    assert first == again
    assert first != other
    # a retry (attempt 1) samples with the next seed
    retried = tiny_rewriter(tiny_model, temperature=0.8, top_p=0.95, seed=7).rewrite(
        [ask(prompt) for prompt in PROMPTS], attempt=1
    )
    assert [reply.text for reply in retried] == other


def test_greedy_replies_do_not_depend_on_the_batch(tiny_model: Path) -> None:
    batched = texts(tiny_rewriter(tiny_model, batch_size=5), PROMPTS)
    one_by_one = texts(tiny_rewriter(tiny_model, batch_size=1), PROMPTS)
    assert batched == one_by_one


def test_model_sees_the_system_prompt_in_its_chat_format(tiny_model: Path) -> None:
    rewriter = tiny_rewriter(tiny_model)
    text = rewriter.chat_text(rewriter.messages("Notes: smiling."))
    assert text == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nNotes: smiling.<|im_end|>\n<|im_start|>assistant\n"
    )
    tokenizer = rewriter.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids.count(start) == 3  # one token each, not spelled out
    assert tokenizer.eos_token == "<|im_end|>"


# -- OpenAI-compatible server -------------------------------------------------------------


def test_replies_keep_prompt_order_within_the_concurrency(tmp_path: Path) -> None:
    def slow_echo(messages: list[dict[str, str]]) -> str:
        time.sleep(0.05)
        return echo(messages)

    prompts = [f"notes {i}" for i in range(20)]
    with ChatServer(slow_echo) as server:
        replies = texts(client(server.base_url, concurrency=4), prompts)
    assert replies == [f"caption of notes {i}" for i in range(20)]
    assert server.count == 20 and 1 < server.max_in_flight <= 4
    assert server.requests[0]["messages"][0] == {"role": "system", "content": SYSTEM}


def test_429_retry_after_is_waited_out() -> None:
    fault = Fault(status=429, headers={"Retry-After": "1"})
    with ChatServer(echo, fault=first_requests(1, fault)) as server:
        started = time.perf_counter()
        replies = texts(client(server.base_url), ["notes"])
        elapsed = time.perf_counter() - started
    assert replies == ["caption of notes"]
    assert elapsed >= 1.0 and server.count == 2


def test_server_error_is_retried() -> None:
    with ChatServer(echo, fault=first_requests(1, Fault(status=500))) as server:
        [reply] = client(server.base_url, retries=1).rewrite([ask("notes")])
    assert reply.text == "caption of notes" and reply.error is None
    assert server.count == 2


def test_timeout_without_retries_gives_none() -> None:
    with ChatServer(echo, fault=lambda number, body: Fault(sleep_s=2.0)) as server:
        [reply] = client(server.base_url, timeout_s=0.3, retries=0).rewrite([ask("notes")])
    assert (reply.text, reply.error) == (None, TIMEOUT)


def test_client_errors_and_empty_replies_are_final() -> None:
    def fault(number: int, body: dict) -> Fault | None:
        content = body["messages"][-1]["content"]
        return {
            "bad": Fault(status=400),
            "empty": Fault(body={"choices": []}),
        }.get(content)

    with ChatServer(echo, fault=fault) as server:
        replies = client(server.base_url, retries=3).rewrite(
            [ask(p) for p in ("bad", "fine", "empty")]
        )
    assert [reply.text for reply in replies] == [None, "caption of fine", None]
    assert server.count == 3  # nothing retried
    assert [reply.error for reply in replies] == [HTTP_ERROR, None, BAD_SHAPE]
    assert "HTTP 400" in replies[0].detail


def test_server_with_the_tiny_model_answers_like_the_model_itself(tiny_model: Path) -> None:
    direct = texts(tiny_rewriter(tiny_model), PROMPTS)
    with ChatServer(model_dir=tiny_model, max_new_tokens=12, batch_size=4) as server:
        rewriter = client(server.base_url, concurrency=5)
        served = texts(rewriter, PROMPTS)
    assert served == direct
    assert max(server.batch_sizes) <= 4 and sum(server.batch_sizes) == 5
    assert rewriter.generated_tokens > 0


# -- choosing a backend -------------------------------------------------------------------


def test_load_rewriter_names_a_missing_model_folder(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path, caption={"backend": "transformers", "model": "Qwen2.5-1.5B-Instruct"}
    )
    with pytest.raises(ModelNotFoundError) as error:
        load_rewriter(settings)
    message = str(error.value)
    assert str(tmp_path.resolve() / "models" / "llm" / "Qwen2.5-1.5B-Instruct") in message
    assert "`facecaption models pull llm Qwen/Qwen2.5-1.5B-Instruct`" in message


def test_load_rewriter_needs_a_base_url_for_openai(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="base_url"):
        load_rewriter(Settings(home=tmp_path, caption={"backend": "openai"}))


def test_load_rewriter_builds_each_backend(tiny_model: Path, tmp_path: Path) -> None:
    local = load_rewriter(
        Settings(
            home=tmp_path,
            caption={"model_path": str(tiny_model), "temperature": 0, "max_new_tokens": 4},
        )
    )
    assert isinstance(local, TransformersRewriter) and len(local.rewrite([ask("notes")])) == 1
    remote = load_rewriter(
        Settings(
            home=tmp_path,
            caption={"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "server_model": "m"},
        )
    )
    # the served model's name, never the server's (internal) URL
    assert remote.model_id == "openai:m"


# -- identity ------------------------------------------------------------------------------


def _identity_in_a_new_process(settings: Settings) -> str:
    """caption_identity as a fresh worker process computes it (no in-memory digests)."""
    code = (
        "import sys; from facecaption.settings import Settings;"
        "from facecaption.models.identity import caption_identity;"
        "print(caption_identity(Settings.model_validate_json(sys.argv[1])))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, settings.model_dump_json()],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    return done.stdout.strip()


def test_weights_are_hashed_once_per_version_across_processes(tmp_path: Path) -> None:
    """A second process reads the weights' digest from the digest cache in `home` instead of
    hashing them again (shown by planting a different digest there: it is believed); a new
    version of the file (mtime) is hashed again."""
    folder = build_tiny_qwen2(tmp_path / "tiny-qwen2")
    settings = Settings(home=tmp_path / "home", caption={"model_path": str(folder)})
    first = _identity_in_a_new_process(settings)
    cache_file = digest_cache_file(settings)
    digests = json.loads(cache_file.read_text())
    [weights_key] = [key for key in digests if ".safetensors|" in key]
    assert first == caption_identity(settings)
    digests[weights_key] = "0" * 64
    cache_file.write_text(json.dumps(digests))
    assert _identity_in_a_new_process(settings) != first  # the planted digest was used
    weights = Path(weights_key.split("|")[0])
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert _identity_in_a_new_process(settings) == first  # a new version: hashed again


def test_rows_name_the_model_with_the_fingerprint_identity(tiny_model: Path, tmp_path: Path):
    settings = Settings(home=tmp_path, caption={"model_path": str(tiny_model)})
    assert load_rewriter(settings).model_id == caption_identity(settings)
