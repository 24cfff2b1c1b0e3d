"""The caption stage end to end: grammar raw text, LLM rewrites through the real backends, the
fidelity check's verdicts, fallbacks, and the text statistics."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from PIL import Image
from scrfd_model import build_scrfd_onnx
from support.chatserver import ChatServer
from support.sampledata import encode
from support.samplesite import Route, SampleSite
from support.tiny_llm import build_tiny_qwen2
from test_detect import DET_FACE
from test_fetch import routes_source

from facecaption.attribute.labels import CELEBA_ATTRIBUTES
from facecaption.caption.grammar import Grammar
from facecaption.caption.stage import text_stats
from facecaption.core.pipeline import Pipeline
from facecaption.core.stage import StageInputError
from facecaption.settings import CaptionSettings, DetectSettings


@pytest.fixture
def attributed_shard(tmp_path, settings):
    return build_attributed_shard(tmp_path, settings)


def build_attributed_shard(tmp_path, settings):
    """A shard through fetch, detect (known faces) and attribute; returns (settings, id)."""
    second = {
        **DET_FACE,
        "box": (400.0, 300.0, 560.0, 480.0),
        "kps": [(440.0, 360.0), (520.0, 360.0), (480.0, 400.0), (450.0, 440.0), (510.0, 440.0)],
    }
    model = build_scrfd_onnx(tmp_path / "scrfd.onnx", [DET_FACE, second])
    settings = settings.model_copy(update={"detect": DetectSettings(model_path=str(model))})
    photos = {
        f"p{i}.png": Route(
            encode(
                Image.effect_mandelbrot((1280, 1280), (-2 + i, -1.5, 1, 1.5), 40 + 10 * i).convert(
                    "RGB"
                ),
                "PNG",
            ),
            "image/png",
        )
        for i in range(2)
    }
    with SampleSite(photos) as site, Pipeline.open(settings) as pipeline:
        [shard_id] = pipeline.select_shards([str(routes_source(tmp_path, site, [*photos]))])
        for stage in ("fetch", "detect", "attribute"):
            pipeline.run(stage, shard_id)
        assert pipeline.state.get_stage(shard_id, "attribute").counts["kept"] == 4
    return settings, shard_id


def attributed_shard_notes(tmp_path, settings):
    """`build_attributed_shard` and the grammar's raw notes of each kept face, in face_id
    order: (settings, shard id, notes)."""
    settings, shard_id = build_attributed_shard(tmp_path, settings)
    with Pipeline.open(settings) as pipeline:
        path = pipeline.store.shard_path(shard_id, "attributes.parquet")
        rows = sorted(pq.read_table(path).to_pylist(), key=lambda face: face["face_id"])
    grammar = Grammar.load()
    notes = [grammar.raw_text(f["valid_labels"], f"0:{f['face_id']}") for f in rows if f["kept"]]
    return settings, shard_id, notes


def _captions(settings, shard_id):
    with Pipeline.open(settings) as pipeline:
        outcome = pipeline.run("caption", shard_id)
        attributes = pq.read_table(
            pipeline.store.shard_path(shard_id, "attributes.parquet")
        ).to_pylist()
        captions = pq.read_table(outcome.artifacts["captions.parquet"]["uri"]).to_pylist()
    return outcome, {a["face_id"]: a for a in attributes}, captions


def test_template_backend_writes_the_grammar_text_per_kept_face(attributed_shard):
    settings, shard_id = attributed_shard
    settings = settings.model_copy(update={"caption": CaptionSettings(backend="template")})
    outcome, attributes, captions = _captions(settings, shard_id)
    grammar = Grammar.load()
    assert len(captions) == outcome.counts["faces"] == 4
    for row in captions:
        labels = attributes[row["face_id"]]["valid_labels"]
        assert row["raw_text"] == grammar.raw_text(labels, f"0:{row['face_id']}")
        assert (row["caption"], row["caption_source"], row["fidelity"]) == (
            row["raw_text"],
            "template",
            "template",
        )
        assert row["word_count"] == len(row["caption"].split())
    assert outcome.counts["fidelity_template"] == 4 and outcome.counts["llm_captions"] == 0


def test_tiny_model_nonsense_falls_back_to_the_grammar(attributed_shard, tmp_path):
    settings, shard_id = attributed_shard
    tiny = build_tiny_qwen2(tmp_path / "tiny")
    caption = CaptionSettings(model_path=str(tiny), max_new_tokens=12, batch_size=4)
    outcome, _, captions = _captions(settings.model_copy(update={"caption": caption}), shard_id)
    assert outcome.counts["fidelity_fallback"] == 4
    for row in captions:
        assert row["caption"] == row["raw_text"] and row["caption_source"] == "template"
        assert row["missing"], "a fallback says what the reply dropped"
        assert row["model_id"].startswith("tiny")


def test_server_replies_pass_retry_or_fall_back(attributed_shard):
    """Four faces, four scripted servers answers: faithful; unfaithful then faithful; stating
    an attribute the face does not have (twice); empty. The retry is a different request: it
    carries the first reply and what was wrong with it, and the next seed."""
    settings, shard_id = attributed_shard
    grammar = Grammar.load()
    with Pipeline.open(settings) as pipeline:
        path = pipeline.store.shard_path(shard_id, "attributes.parquet")
        faces = sorted(pq.read_table(path).to_pylist(), key=lambda face: face["face_id"])
    notes = {
        grammar.raw_text(f["valid_labels"], f"0:{f['face_id']}"): i for i, f in enumerate(faces)
    }
    absent = next(
        name
        for name in CELEBA_ATTRIBUTES
        if faces[2][f"p_{name}"] < 0.05 and name not in ("Attractive", "Blurry", "Male")
    )
    untrue = grammar.raw_text([absent], "untrue")
    asked: dict[int, int] = {}
    retries: dict[int, list[dict]] = {}

    def reply(messages: list[dict]) -> str:
        text = messages[1]["content"].split("Notes: ", 1)[1]
        face = notes[text]
        asked[face] = asked.get(face, 0) + 1
        if asked[face] == 2:
            retries[face] = messages
        return {
            0: text,
            1: "A face." if asked[face] == 1 else text,
            2: f"{text} {untrue}",
            3: "",
        }[face]

    with ChatServer(reply) as server:
        caption = CaptionSettings(backend="openai", base_url=server.url, server_model="echo")
        outcome, _, captions = _captions(settings.model_copy(update={"caption": caption}), shard_id)
    rows = sorted(captions, key=lambda row: row["face_id"])
    assert [row["fidelity"] for row in rows] == ["pass", "retry_pass", "fallback", "fallback"]
    assert [row["caption_source"] for row in rows] == ["llm", "llm", "template", "template"]
    assert absent in rows[2]["contradicted"] and rows[2]["caption"] == rows[2]["raw_text"]
    assert asked == {0: 1, 1: 2, 2: 2, 3: 1}  # an empty reply is not asked again
    assert [row["rewrite_error"] for row in rows] == [None, None, None, "empty_reply"]
    assert outcome.counts["llm_captions"] == 2 and outcome.counts["rewrite_empty_reply"] == 1
    assert all(row["model_id"] == "openai:echo" for row in captions)  # no server URL
    # the retry: the first reply as the assistant's turn, then what it got wrong
    first_reply = {1: "A face.", 2: f"{rows[2]['raw_text']} {untrue}"}
    for face, messages in retries.items():
        assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
        assert messages[2]["content"] == first_reply[face]
    assert "leaves out" in retries[1][3]["content"]
    assert f"contradicts them on {absent.replace('_', ' ').lower()}" in retries[2][3]["content"]
    seeds = [request["seed"] for request in server.requests]
    assert sorted(set(seeds)) == [0, 1] and seeds.count(1) == 2


def test_caption_waits_for_attributes(tmp_path, settings):
    with SampleSite({}) as site, Pipeline.open(settings) as pipeline:
        [shard_id] = pipeline.select_shards([str(routes_source(tmp_path, site, ["x.png"]))])
        with pytest.raises(StageInputError, match="attribute"):
            pipeline.run("caption", shard_id)


def test_text_stats_count_words_and_distinct_four_grams():
    stats = text_stats(["He has a big nose.", "He has a big nose and a smile.", ""])
    assert stats == {"captions": 3, "words": 13, "unique_4grams": 5}
