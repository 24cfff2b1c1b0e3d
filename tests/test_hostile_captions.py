"""The caption battery: every kind of broken reply an OpenAI-compatible server can send, served
for real over loopback to the caption stage, and the caption cap on both backends.

Four faces get captions; the server answers three of them faithfully and sends one kind of
broken reply for the fourth. For each kind: that face falls back to the grammar's text with
the typed `rewrite_error` (or, for an over-long reply, keeps the capped LLM text flagged
`reply_truncated`), the other three rows equal those of a run with no fault, the stage is
`done`, and a forced re-run writes a byte-identical captions.parquet (each kind's first run is
fresh: it asks for every face again).
"""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq
import pytest
from support.chatserver import ChatServer, Fault
from support.tiny_llm import build_tiny_qwen2
from test_caption import attributed_shard_notes

from facecaption.caption.rewriters import TRANSIENT_ERRORS
from facecaption.caption.stage import cap_caption
from facecaption.core.pipeline import Pipeline
from facecaption.settings import CaptionSettings

TIMEOUT_S = 1.0  # the battery's request deadline
MAX_REPLY_BYTES = 1_048_576  # the default


def completion(content: object = "fine", **extra: object) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
        "usage": {"completion_tokens": 3},
        **extra,
    }


def encoded(content: str) -> bytes:
    """A faithful completion as UTF-8 JSON bytes, to be broken by hand."""
    return json.dumps(completion(content), ensure_ascii=False).encode()


def raw(body: bytes, **options: object) -> Fault:
    return Fault(raw=body, **options)


def wire(answer: bytes) -> Fault:
    return Fault(wire=answer)


# kind -> (the fault sent for the target face, given its notes; the rewrite_error it gets)
REPLY_FAULTS = {
    "choices-a-dict": (lambda notes: Fault(body={"choices": {"0": notes}}), "bad_shape"),
    "choices-a-string": (lambda notes: Fault(body={"choices": notes}), "bad_shape"),
    "choices-[1]": (lambda notes: Fault(body={"choices": [1]}), "bad_shape"),
    "choices-empty": (lambda notes: Fault(body={"choices": []}), "bad_shape"),
    "choices-missing": (lambda notes: Fault(body={"object": "chat.completion"}), "bad_shape"),
    "message-a-string": (lambda notes: Fault(body={"choices": [{"message": notes}]}), "bad_shape"),
    "message-null": (lambda notes: Fault(body={"choices": [{"message": None}]}), "bad_shape"),
    "content-a-list": (
        lambda notes: Fault(body=completion([{"type": "text", "text": notes}])),
        "bad_shape",
    ),
    "content-a-number": (lambda notes: Fault(body=completion(42)), "bad_shape"),
    "content-null": (lambda notes: Fault(body=completion(None)), "bad_shape"),
    "usage-a-string": (lambda notes: Fault(body=completion(notes, usage="3")), "bad_shape"),
    "tokens-not-a-number": (
        lambda notes: Fault(body=completion(notes, usage={"completion_tokens": "many"})),
        "bad_shape",
    ),
    "tokens-negative": (
        lambda notes: Fault(body=completion(notes, usage={"completion_tokens": -5})),
        "bad_shape",
    ),
    "tokens-nan": (lambda notes: raw(encoded(notes).replace(b": 3}", b": NaN}")), "bad_shape"),
    "tokens-5000-digits": (
        lambda notes: raw(encoded(notes).replace(b": 3}", b": " + b"9" * 5000 + b"}")),
        "not_json",
    ),
    "json-a-list": (lambda notes: Fault(body=[completion(notes)]), "bad_shape"),
    "json-a-string": (lambda notes: Fault(body=notes), "bad_shape"),
    "json-nested-200000-deep": (lambda notes: raw(b"[" * 200_000 + b"]" * 200_000), "not_json"),
    "invalid-utf8": (
        lambda notes: raw(encoded(notes + " café").replace("é".encode(), b"\xe9")),
        "not_utf8",
    ),
    "lone-surrogate-escape": (  # a faithful caption with "\ud800" in it: not writable text
        lambda notes: raw(encoded(notes + " SURROGATE").replace(b"SURROGATE", b"\\ud800")),
        "not_utf8",
    ),
    "utf8-bom": (lambda notes: raw(b"\xef\xbb\xbf" + json.dumps(completion(notes)).encode()),
                 "not_json"),
    "empty-content": (lambda notes: Fault(body=completion("")), "empty_reply"),
    "whitespace-content": (lambda notes: Fault(body=completion(" \n\t ")), "empty_reply"),
    "html-page-with-200": (
        lambda notes: raw(b"<!doctype html><h1>502 Bad Gateway</h1>", content_type="text/html"),
        "not_json",
    ),
    "gzip-body": (
        lambda notes: raw(gzip.compress(json.dumps(completion(notes)).encode()),
                          headers={"Content-Encoding": "gzip"}),
        "not_utf8",
    ),
    "30mb-chunked": (
        lambda notes: raw(b" " * 30_000_000, chunked=True, piece_bytes=1 << 20), "reply_too_large"
    ),
    "30mb-declared": (lambda notes: raw(b" " * 30_000_000), "reply_too_large"),
    "trickle-past-deadline": (
        lambda notes: raw(json.dumps(completion(notes)).encode(), piece_bytes=16,
                          piece_sleep_s=0.25),
        "timeout",
    ),
    "silent-past-deadline": (lambda notes: Fault(sleep_s=2 * TIMEOUT_S), "timeout"),
    "chunked-garbage": (
        lambda notes: wire(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n"),
        "bad_http",
    ),
    "broken-status-line": (lambda notes: wire(b"HTTP/1.1 2x0 OK\r\n\r\n"), "bad_http"),
    "not-http-at-all": (lambda notes: wire(b"\x00\xff\xfe garbage\r\n\r\n"), "bad_http"),
    "body-shorter-than-declared": (
        lambda notes: wire(b"HTTP/1.1 200 OK\r\nContent-Length: 900\r\n\r\n{\"choices\": ["),
        "bad_http",
    ),
    "closed-without-answer": (lambda notes: wire(b""), "connection_error"),
    "http-404": (lambda notes: Fault(status=404), "http_error"),
    "http-503-every-time": (lambda notes: Fault(status=503), "server_error"),
    "http-429-every-time": (
        lambda notes: Fault(status=429, headers={"Retry-After": "0"}), "server_error"
    ),
    "redirect-302": (
        lambda notes: Fault(status=302, headers={"Location": "http://127.0.0.1:1/v1"}),
        "http_error",
    ),
}  # fmt: skip


@pytest.fixture
def faces(tmp_path, settings):
    """(settings, shard id, raw notes of each face in face_id order) of a shard whose faces
    are attributed."""
    return attributed_shard_notes(tmp_path, settings)


def faithful(messages: list[dict]) -> str:
    """Every face's notes, back as its caption: passes the fidelity check."""
    return messages[1]["content"].split("Notes: ", 1)[1]


def caption_run(settings, shard_id, server: ChatServer, *, force: bool = True, fresh=False):
    caption = CaptionSettings(
        backend="openai",
        base_url=server.base_url,
        server_model="echo",
        timeout_s=TIMEOUT_S,
        retries=1,
    )
    with Pipeline.open(settings.model_copy(update={"caption": caption})) as pipeline:
        pipeline.run("caption", shard_id, force=force, fresh=fresh)
        state = pipeline.state.get_stage(shard_id, "caption")
        rows = pq.read_table(state.artifacts["captions.parquet"]["uri"]).to_pylist()
    return state, sorted(rows, key=lambda row: row["face_id"])


def test_every_broken_reply_falls_back_with_its_reason_and_nothing_else_moves(faces):
    settings, shard_id, notes = faces
    target = 2
    with ChatServer(faithful) as server:
        clean_state, clean = caption_run(settings, shard_id, server, force=False)
    assert clean_state.status == "done" and [r["fidelity"] for r in clean] == ["pass"] * 4
    failures = []
    for kind, (make_fault, reason) in REPLY_FAULTS.items():
        fault = make_fault(notes[target])

        def hook(number: int, body: dict, fault: Fault = fault) -> Fault | None:
            return fault if faithful(body["messages"]) == notes[target] else None

        with ChatServer(faithful, fault=hook) as server:
            # fresh: every face asked (a plain forced run keeps the faces that are final)
            state, rows = caption_run(settings, shard_id, server, fresh=True)
            again_state, again = caption_run(settings, shard_id, server)
        problems = []
        if state.status != "done":
            problems.append(f"stage {state.status}: {state.last_error}")
        row = rows[target]
        got = (row["rewrite_error"], row["fidelity"], row["caption_source"], row["caption"])
        if got != (reason, "fallback", "template", row["raw_text"]):
            problems.append(f"target row {got[:3]}, caption {row['caption'][:40]!r}")
        transient = reason in TRANSIENT_ERRORS
        if state.counts.get(f"rewrite_{reason}") != 1 or state.counts["retryable"] != transient:
            problems.append(f"counts {state.counts}")
        if [r for i, r in enumerate(rows) if i != target] != [
            r for i, r in enumerate(clean) if i != target
        ]:
            problems.append("a neighbouring face's row changed")
        if again_state.artifacts != state.artifacts or again != rows:
            problems.append("a forced re-run changed captions.parquet")
        failures += [f"{kind}: {problem}" for problem in problems]
    assert not failures, "\n".join(failures)


def test_a_huge_reply_becomes_a_capped_caption_flagged_truncated(faces):
    """A 1 MB reply (under the byte cap) is cut to max_caption_words before anything reads
    it, and still passes the fidelity check as the LLM's caption."""
    settings, shard_id, notes = faces
    target = 1

    def reply(messages: list[dict]) -> str:
        text = faithful(messages)
        return (text + " ") * (1_000_000 // (len(text) + 1)) if text == notes[target] else text

    with ChatServer(reply) as server:
        state, rows = caption_run(settings, shard_id, server, fresh=True)
        _, again = caption_run(settings, shard_id, server)
    row = rows[target]
    limits = CaptionSettings()
    assert state.status == "done" and state.counts["rewrite_reply_truncated"] == 1
    assert (row["rewrite_error"], row["caption_source"], row["fidelity"]) == (
        "reply_truncated",
        "llm",
        "pass",
    )
    assert row["word_count"] <= limits.max_caption_words
    assert len(row["caption"]) <= limits.max_caption_chars
    assert row["caption"].startswith(notes[target])
    assert [r["rewrite_error"] for i, r in enumerate(rows) if i != target] == [None] * 3
    assert again == rows


def test_cap_caption_cuts_at_words_then_characters():
    assert cap_caption("a b c", 5, 100) == ("a b c", False)
    assert cap_caption("one two three four", 2, 100) == ("one two", True)
    assert cap_caption("alpha beta gamma", 10, 12) == ("alpha beta", True)
    assert cap_caption("x" * 50, 10, 20) == ("x" * 20, True)  # one giant word: a hard cut
    assert cap_caption("  padded   text  ", 10, 100) == ("  padded   text  ", False)


def test_in_process_replies_get_the_same_cap(faces, tmp_path):
    """The transformers backend's replies are capped like the server's: the tiny model's
    noise runs past a 1-word, 2-character cap, and the faces record it. (Its random weights
    sometimes end a reply within a few words, and CPU threads may break near-ties of its
    logits either way: a cap any few tokens of noise pass keeps the test deterministic.)"""
    settings, shard_id, _ = faces
    tiny = build_tiny_qwen2(tmp_path / "tiny")
    caption = CaptionSettings(
        model_path=str(tiny), max_new_tokens=12, temperature=0.0, max_caption_words=1,
        max_caption_chars=2,
    )  # fmt: skip
    with Pipeline.open(settings.model_copy(update={"caption": caption})) as pipeline:
        outcome = pipeline.run("caption", shard_id, force=True, fresh=True)
        rows = pq.read_table(outcome.artifacts["captions.parquet"]["uri"]).to_pylist()
        again = pipeline.run("caption", shard_id, force=True)
    truncated = [row for row in rows if row["rewrite_error"] == "reply_truncated"]
    assert outcome.status == "done" and truncated
    assert outcome.counts["rewrite_reply_truncated"] == len(truncated)
    # noise fails the fidelity check: the caption is the grammar's, whatever its length
    assert all(row["caption"] == row["raw_text"] for row in rows)
    assert again.artifacts == outcome.artifacts


def test_a_refresh_asks_again_for_faces_that_met_a_transient_fault(faces):
    """A face whose server was down gets the grammar's text and counts as retryable; a plain
    re-run keeps it, a refresh (retry_transient) asks again and captions it (with no pause
    between runs here: test_caption_retry_budget.py pins the pauses)."""
    settings, shard_id, notes = faces
    down = {"target": notes[0]}

    def hook(number: int, body: dict) -> Fault | None:
        return Fault(status=503) if faithful(body["messages"]) == down["target"] else None

    caption = CaptionSettings(
        backend="openai", server_model="echo", retries=0, face_retry_pause_s=0
    )
    with ChatServer(faithful, fault=hook) as server:
        caption = caption.model_copy(update={"base_url": server.base_url})
        with Pipeline.open(settings.model_copy(update={"caption": caption})) as pipeline:
            first = pipeline.run("caption", shard_id)
            assert first.counts["retryable"] == 1 and first.counts["rewrite_server_error"] == 1
            assert pipeline.run("caption", shard_id).status == "skipped"
            down["target"] = None  # the server is back
            again = pipeline.run("caption", shard_id, retry_transient=True)
            rows = pq.read_table(again.artifacts["captions.parquet"]["uri"]).to_pylist()
    assert again.status == "done" and again.counts["retryable"] == 0
    assert all(row["fidelity"] == "pass" and row["rewrite_error"] is None for row in rows)
