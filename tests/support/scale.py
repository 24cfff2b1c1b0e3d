"""Synthetic state at LAION-Face scale, written straight into a throwaway state DB (COPY), for
the query-count tests and `bench/bench_scale.py`: sources and shards as `plan` registers them,
every stage done with realistic counts and artifact checksums, fingerprints that are current
for the given settings (so a `stale` selection checks every stage of every shard) and the
inputs they cover, the export stage's report statistics, the attempt history, the
fetched-image index and a few pending takedown requests. Nothing on disk: no artifact is read
by what this is for.

Also `count_queries`: every statement any engine sends while the block runs.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import sqlalchemy as sa
from PIL import Image
from sqlalchemy.engine import Engine

from facecaption.core.fingerprints import Fingerprints, PrefetchedStageInputs
from facecaption.core.stage import stage_registry
from facecaption.release.stats import (
    BRISQUE_BINS,
    SIDE_BINS,
    STATS_FORMAT,
    TEXT_KINDS,
    THUMBNAILS,
    WORD_BINS,
    DistinctSketch,
    thumbnail,
)
from facecaption.settings import Settings
from facecaption.state import Shard, StageState

SHARDS_PER_SOURCE = 156  # 1.56M rows per LAION-Face part, 10,000 rows per shard
ROWS_PER_SHARD = 10_000
WORDS = [
    "he",
    "she",
    "has",
    "wears",
    "smiling",
    "young",
    "brown",
    "hair",
    "bangs",
    "big",
    "nose",
    "earrings",
    "hat",
    "a",
    "the",
    "and",
]


@contextmanager
def count_queries() -> Iterator[list[str]]:
    """The statements every engine in this process executes inside the block."""
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    sa.event.listen(Engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        sa.event.remove(Engine, "before_cursor_execute", record)


def _hex(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def _counts(stage: str, rng: random.Random) -> dict[str, int]:
    rows = ROWS_PER_SHARD
    ok = rng.randint(6800, 7800)
    faces = rng.randint(3500, 5000)
    kept = int(faces * rng.uniform(0.6, 0.7))
    return {
        "fetch": {
            "rows": rows, "ok": ok, "duplicate": 40, "http_error": rows - ok - 340,
            "timeout": 200, "opted_out": 100, "bytes": ok * 120_000, "fetched": rows,
            "reused": 0, "retryable": 0,
        },
        "detect": {
            "images": ok, "images_with_faces": int(ok * 0.7), "faces_detected": faces + 900,
            "faces_kept": faces, "dropped_low_score": 500, "dropped_too_small": 400,
        },
        "attribute": {"faces": faces, "kept": kept, "contradictions": 12},
        "caption": {
            "faces": kept, "llm_captions": int(kept * 0.9), "fidelity_fallback": kept // 10,
        },
        "export": {"captioned": kept, "released": kept, "taken_down": 0, "images": kept // 2},
    }[stage]  # fmt: skip


_ARTIFACTS = {
    "fetch": ("fetch.tar", "fetch.parquet"),
    "detect": ("faces.tar", "faces.parquet"),
    "attribute": ("attributes.parquet",),
    "caption": ("captions.parquet",),
    "export": ("release.parquet",),
}


def _sketches(count: int, grams: int) -> list[str]:
    rng = random.Random(7)
    texts = []
    for _ in range(count):
        sketch = DistinctSketch()
        sketch.update(" ".join(rng.choices(WORDS, k=4)) + str(rng.random()) for _ in range(grams))
        texts.append(sketch.to_text())
    return texts


def _stats(shard_id: str, released: int, rng: random.Random, sketches: list[str]) -> dict:
    def bins(edges: list[float], total: int) -> list[int]:
        weights = [rng.random() for _ in range(len(edges) - 1)]
        return [int(total * w / sum(weights)) for w in weights]

    return {
        "format": STATS_FORMAT,
        "image_min_side": bins(SIDE_BINS, 7000),
        "face_min_side": bins(SIDE_BINS, 4000),
        "attributes": {"Male": released // 2, "Young": released // 3, "Smiling": released // 4},
        "caption_words": bins(WORD_BINS, released),
        "caption_sources": {"llm": released - released // 10, "template": released // 10},
        "fidelity": {"pass": released - released // 10, "fallback": released // 10},
        "ngrams": {
            kind: {"captions": released, "sketch": rng.choice(sketches)} for kind in TEXT_KINDS
        },
        "quality": {
            "released": released,
            "scores": [
                [f"{shard_id}/{i:09d}_00", round(rng.uniform(BRISQUE_BINS[1], 80), 4)]
                for i in range(8)
            ],
            "note": "",
        },
        "models": {
            "detect": {"retinaface.onnx@sha256:b7a7": released + released // 5},
            "attribute": {"celeba40-resnet50.onnx@sha256:0a1b": released + released // 10},
            "caption": {"Qwen2.5-7B-Instruct@sha256:9c8d": released},
        },
        "gallery": [
            {
                "face_id": f"{shard_id}/{i:09d}_00",
                "raw_text": " ".join(rng.choices(WORDS, k=12)),
                "caption": " ".join(rng.choices(WORDS, k=20)),
                "caption_source": "llm",
                "fidelity": "pass",
                "labels": ["Male", "Young", "Smiling", "Brown_Hair", "Big_Nose"],
            }
            for i in range(4)
        ],
        THUMBNAILS: {f"{shard_id}/{i:09d}_00": _thumbnail() for i in range(4)},
    }


@functools.cache
def _thumbnail() -> str:
    """A gallery thumbnail of a face crop's size (a smooth 112 px JPEG)."""
    ramp = np.linspace(40, 220, 112, dtype=np.uint8)
    pixels = np.stack([np.add.outer(ramp // 2, ramp // 2)] * 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=95)
    return thumbnail(buffer.getvalue())


def _copy(engine: Engine, table: str, columns: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow(["\\N" if value is None else value for value in row])
    buffer.seek(0)
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cursor:
            cursor.copy_expert(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv, NULL '\\N')",
                buffer,
            )
        raw.commit()
    finally:
        raw.close()


def image_url(shard_id: str, key: int) -> str:
    return f"https://images.example.org/{shard_id[:12]}/{shard_id[13:22]}/{key:09d}.jpg"


def image_sha256(shard_id: str, key: int) -> str:
    return _hex("image", shard_id, key)


def populate(
    engine: Engine,
    settings: Settings,
    shards: int,
    *,
    first: int = 0,
    index_rows: int = 100,
    takedown_requests: int = 5,
    seed: int = 0,
) -> list[str]:
    """Register shards `first .. first + shards - 1` (ids stable across calls) with every
    stage done and current for `settings`; `index_rows` fetched images per shard in the
    takedown index; and `takedown_requests` pending requests (a URL and a sha256 each) that
    match rows of the first shards. Returns the new shard ids."""
    rng = random.Random(seed + first)
    registry = stage_registry()
    sketches = _sketches(8, 3000)
    source_rows, file_rows, shard_rows = [], [], []
    shard_objects: list[Shard] = []
    for index in range(first, first + shards):
        source_index, shard_index = divmod(index, SHARDS_PER_SOURCE)
        source_id = _hex("source", source_index)
        uri = f"/data/laion-face/part-{source_index:05d}.parquet"
        if shard_index == 0 or index == first:
            source_rows.append(
                [source_id, uri, uri.rsplit("/", 1)[1], 300_000_000,
                 SHARDS_PER_SOURCE * ROWS_PER_SHARD, ROWS_PER_SHARD,
                 json.dumps({"url": "URL", "caption": "TEXT", "sample_id": "SAMPLE_ID"})]
            )  # fmt: skip
            file_rows.append([uri, source_id, 300_000_000, f"mtime_ns={source_index}", None])
        start = shard_index * ROWS_PER_SHARD
        shard_id = f"{source_id[:12]}_{start:09d}_{start + ROWS_PER_SHARD:09d}"
        shard_rows.append([shard_id, source_id, shard_index, start, start + ROWS_PER_SHARD])
        shard_objects.append(
            Shard(shard_id, source_id, shard_index, start, start + ROWS_PER_SHARD, uri,
                  {"url": "URL", "caption": "TEXT", "sample_id": "SAMPLE_ID"})
        )  # fmt: skip
    with engine.begin() as conn:
        known = {
            row.source_id
            for row in conn.execute(
                sa.text("SELECT source_id FROM sources WHERE source_id = ANY(:ids)"),
                {"ids": [row[0] for row in source_rows]},
            )
        }
    source_rows = [row for row in source_rows if row[0] not in known]
    file_rows = [row for row in file_rows if row[1] not in known]
    _copy(engine, "sources",
          ["source_id", "uri", "name", "size_bytes", "num_rows", "shard_size", "columns"],
          source_rows)  # fmt: skip
    _copy(engine, "source_files", ["uri", "source_id", "size_bytes", "modified", "etag"], file_rows)
    _copy(engine, "shards", ["shard_id", "source_id", "shard_index", "row_start", "row_end"],
          shard_rows)  # fmt: skip

    # Stages in pipeline order, each fingerprinted as the code would now (its inputs are the
    # states written before it).
    states: list[StageState] = []
    inputs = PrefetchedStageInputs([], {})
    stage_rows, event_rows, stats_rows, indexed_rows = [], [], [], []
    for stage_name in registry:
        fingerprints = Fingerprints(settings, registry, inputs)
        settings_part = registry[stage_name].settings_inputs(settings)
        for shard in shard_objects:
            # what the stage ran on, recorded as a finished run records it
            ran_on = json.loads(
                json.dumps(
                    {**registry[stage_name].shard_inputs(shard, settings, inputs),
                     **settings_part},
                    sort_keys=True, default=str,
                )
            )  # fmt: skip
            counts = _counts(stage_name, rng)
            artifacts = {
                name: {"uri": f"/store/shards/{shard.shard_id}/{name}",
                       "sha256": _hex(stage_name, name, shard.shard_id), "bytes": 1000}
                for name in _ARTIFACTS[stage_name]
            }  # fmt: skip
            state = StageState(
                shard.shard_id, stage_name, "done", 1, "bench:1", counts=counts,
                artifacts=artifacts, fingerprint=fingerprints.current(stage_name, shard),
                inputs=ran_on,
            )  # fmt: skip
            states.append(state)
            stage_rows.append(
                [shard.shard_id, stage_name, "done", 1, "bench:1", "2026-01-01T00:00:00Z",
                 "2026-01-01T00:01:00Z", json.dumps(counts), json.dumps(artifacts),
                 state.fingerprint, json.dumps(ran_on)]
            )  # fmt: skip
            event_rows.append(
                [shard.shard_id, stage_name, 1, "done", "bench:1", rng.uniform(20, 200),
                 json.dumps(counts), state.fingerprint]
            )  # fmt: skip
            if stage_name == "export":
                stats = _stats(shard.shard_id, counts["released"], rng, sketches)
                stats_rows.append([shard.shard_id, "export", 1, json.dumps(stats)])
        inputs = PrefetchedStageInputs(states, {})
    for shard in shard_objects:
        indexed_rows.append([shard.shard_id, _hex("fetch", "fetch.parquet", shard.shard_id)])
    _copy(engine, "shard_stages",
          ["shard_id", "stage", "status", "attempt", "worker", "started_at", "finished_at",
           "counts", "artifacts", "fingerprint", "inputs"], stage_rows)  # fmt: skip
    _copy(engine, "stage_events",
          ["shard_id", "stage", "attempt", "event", "worker", "duration_s", "counts",
           "fingerprint"], event_rows)  # fmt: skip
    _copy(engine, "stage_stats", ["shard_id", "stage", "attempt", "stats"], stats_rows)
    with engine.begin() as conn:  # generated by the server: the same values as image_url/sha256
        conn.execute(
            sa.text(
                "INSERT INTO fetched_images (shard_id, key, url, sha256)"
                " SELECT s.shard_id, lpad(k::text, 9, '0'), 'https://images.example.org/'"
                " || left(s.shard_id, 12) || '/' || substr(s.shard_id, 14, 9) || '/'"
                " || lpad(k::text, 9, '0') || '.jpg',"
                " encode(sha256(convert_to('image/' || s.shard_id || '/' || k, 'UTF8')), 'hex')"
                " FROM shards s CROSS JOIN generate_series(0, :n - 1) AS k"
                " WHERE s.shard_id = ANY(:ids)"
            ),
            {"n": index_rows, "ids": [shard.shard_id for shard in shard_objects]},
        )
    _copy(engine, "fetched_images_indexed", ["shard_id", "parquet_sha256"], indexed_rows)
    if takedown_requests:
        with engine.begin() as conn:
            for request in range(takedown_requests):
                shard_id = shard_objects[request % len(shard_objects)].shard_id
                urls = [image_url(shard_id, request % max(index_rows, 1))]
                shas = [image_sha256(shard_id, (request + 1) % max(index_rows, 1))]
                request_id = conn.execute(
                    sa.text(
                        "INSERT INTO takedown_requests (requested_by, reason, urls, sha256s)"
                        " VALUES ('bench', 'synthetic', CAST(:u AS jsonb), CAST(:s AS jsonb))"
                        " RETURNING request_id"
                    ),
                    {"u": json.dumps(urls), "s": json.dumps(shas)},
                ).scalar_one()
                conn.execute(
                    sa.text(
                        "INSERT INTO takedown_items (kind, value, request_id) SELECT k, v, :r"
                        " FROM unnest(CAST(:kinds AS text[]), CAST(:values AS text[])) AS i(k, v)"
                    ),
                    {"r": request_id, "kinds": ["url", "sha256"], "values": urls + shas},
                )
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE"))
    return [shard.shard_id for shard in shard_objects]
