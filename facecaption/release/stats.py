"""Per-shard statistics for the dataset report, worked out once when the export stage runs
(from the shard's artifacts, column by column) and stored with it in the state DB, so that a
report over 5,000 shards reads no shard artifact at all: it merges these.

A shard's statistics: histograms of image and face-crop shorter sides and of caption lengths
(fixed bins), attribute counts of kept faces, caption sources and fidelity outcomes, a
HyperLogLog sketch of the distinct word 4-grams of the grammar's text and of the LLM's
captions (sketches merge; distinct counts do not add up), and BRISQUE scores of the shard's
first `export.quality_crops_per_shard` released crops (in source row order, so only the start
of `faces.tar` is read), the faces each model made (per model stage), and the report's
gallery candidates: the shard's first `export.gallery_faces_per_shard` released faces (also
read from the start of `faces.tar`; a face under a takedown is not released, so never shown)
with their labels, texts and fidelity verdict, and, apart under `THUMBNAILS`, each one's crop
as a small JPEG. The report picks at most
`export.report_max_crops` of all shards' scored crops and `export.report_gallery_faces` of
their gallery faces by a hash of the face id: the same ones from one report to the next while
their shards are unchanged; it reads the thumbnails of the faces it shows only.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import io
import math
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from facecaption.attribute.labels import CELEBA_ATTRIBUTES
from facecaption.caption.stage import ngrams, words
from facecaption.core.artifacts import (
    ATTRIBUTES_PARQUET,
    CAPTIONS_PARQUET,
    FACES_PARQUET,
    FACES_TAR,
    FETCH_PARQUET,
)
from facecaption.core.store import ArtifactStore
from facecaption.core.writers import iter_webdataset

STATS_FORMAT = 2  # 2: models, gallery, thumbnails
SIDE_BINS = [0, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096, math.inf]
WORD_BINS = [0, 10, 20, 30, 40, 50, 60, 80, 100, 150, math.inf]
BRISQUE_BINS = [-math.inf, 0, 10, 20, 30, 40, 50, 60, 80, math.inf]
TEXT_KINDS = ("template", "llm")
MODEL_STAGES = ("detect", "attribute", "caption")  # their rows name the model that made them
GALLERY_FIELDS = ("face_id", "raw_text", "caption", "caption_source", "fidelity")
# The gallery's crops, kept apart from the rest of a shard's statistics so that the report
# reads every shard's numbers without them and then only the thumbnails it shows.
THUMBNAILS = "thumbnails"
THUMBNAIL_PX = 112  # gallery crops: longer side, px (the ArcFace crop size)
THUMBNAIL_JPEG_QUALITY = 80


def histogram(values: Iterable[float], edges: list[float]) -> list[int]:
    """Counts per bin [edges[i], edges[i + 1])."""
    counts = [0] * (len(edges) - 1)
    for value in values:
        index = bisect.bisect_right(edges, value) - 1
        if 0 <= index < len(counts):
            counts[index] += 1
    return counts


class DistinctSketch:
    """A HyperLogLog sketch of distinct items (2**12 registers: about 1.6% standard error;
    exact enough to compare the grammar's and the LLM's vocabulary). Sketches of shards merge
    into the sketch of their union."""

    PRECISION = 12
    REGISTERS = 1 << PRECISION
    _REST_BITS = 64 - PRECISION
    MERGE_BATCH = 1024  # sketches `merge_texts` stacks at once: 4 MiB of registers

    def __init__(self, registers: np.ndarray | None = None) -> None:
        self.registers = (
            np.zeros(self.REGISTERS, np.uint8) if registers is None else registers.copy()
        )

    def update(self, items: Iterable[str]) -> None:
        hashes = np.fromiter(
            (
                int.from_bytes(hashlib.blake2b(item.encode(), digest_size=8).digest(), "big")
                for item in items
            ),
            dtype=np.uint64,
        )
        if not hashes.size:
            return
        index = (hashes >> np.uint64(self._REST_BITS)).astype(np.intp)
        rest = hashes & np.uint64((1 << self._REST_BITS) - 1)
        # rest < 2**52 is exact as a float64, so frexp's exponent is its bit length
        _, bit_length = np.frexp(rest.astype(np.float64))
        rank = (self._REST_BITS + 1 - np.where(rest > 0, bit_length, 0)).astype(np.uint8)
        np.maximum.at(self.registers, index, rank)

    def merge(self, other: DistinctSketch) -> None:
        np.maximum(self.registers, other.registers, out=self.registers)

    def estimate(self) -> int:
        m = self.REGISTERS
        zeros = int(np.count_nonzero(self.registers == 0))
        if zeros == m:
            return 0
        alpha = 0.7213 / (1 + 1.079 / m)
        raw = alpha * m * m / float(np.sum(np.ldexp(1.0, -self.registers.astype(np.int64))))
        if raw <= 2.5 * m and zeros:
            return round(m * math.log(m / zeros))  # linear counting: small sets
        return round(raw)

    def to_text(self) -> str:
        return base64.b64encode(zlib.compress(self.registers.tobytes(), 9)).decode("ascii")

    @classmethod
    def from_text(cls, text: str) -> DistinctSketch:
        raw = zlib.decompress(base64.b64decode(text))
        return cls(np.frombuffer(raw, np.uint8))

    def merge_texts(self, texts: Iterable[str]) -> None:
        """Merge many sketches in their text form (`to_text`): what merging each `from_text`
        does, in one numpy maximum per batch of them (the report merges two per shard)."""
        batch: list[bytes] = []
        for text in texts:
            batch.append(zlib.decompress(base64.b64decode(text)))
            if len(batch) == self.MERGE_BATCH:
                self._merge_raw(batch)
                batch = []
        if batch:
            self._merge_raw(batch)

    def _merge_raw(self, batch: list[bytes]) -> None:
        stacked = np.frombuffer(b"".join(batch), np.uint8).reshape(len(batch), self.REGISTERS)
        np.maximum(self.registers, stacked.max(axis=0), out=self.registers)


def _gram_text(gram: tuple[str, ...]) -> str:
    return "\x1f".join(gram)


def shard_stats(
    store: ArtifactStore,
    shard_id: str,
    released_face_ids: list[str],
    quality_crops: int,
    gallery_faces: int,
    read: Callable[[str, list[str]], list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The report's statistics of one exported shard, read from its artifacts column by
    column; `released_face_ids` are its release rows' face ids. `read(name, columns)` reads
    a parquet artifact's columns (the export passes the input files it checked); by default
    they are read from the store as they are."""

    def from_store(name: str, columns: list[str]) -> list[dict[str, Any]]:
        return store.read_table(store.shard_path(shard_id, name), columns).to_pylist()

    column_rows = read or from_store

    image_sides = [
        min(row["width"], row["height"])
        for row in column_rows(FETCH_PARQUET, ["status", "width", "height"])
        if row["status"] == "ok" and row["width"] and row["height"]
    ]
    models: dict[str, Counter[str]] = {stage: Counter() for stage in MODEL_STAGES}
    face_sides = []
    for row in column_rows(FACES_PARQUET, ["crop_width", "crop_height", "detector_id"]):
        face_sides.append(min(row["crop_width"], row["crop_height"]))
        models["detect"][row["detector_id"]] += 1
    labels: Counter[str] = Counter()
    valid_labels: dict[str, list[str]] = {}
    for row in column_rows(ATTRIBUTES_PARQUET, ["face_id", "kept", "valid_labels", "model_id"]):
        models["attribute"][row["model_id"]] += 1
        valid_labels[row["face_id"]] = row["valid_labels"]
        if row["kept"]:
            labels.update(row["valid_labels"])
    lengths: list[int] = []
    fidelity: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    sketches = {kind: DistinctSketch() for kind in TEXT_KINDS}
    texts = Counter[str]()
    released = set(released_face_ids)
    shown: dict[str, dict[str, Any]] = {}  # what the gallery shows of each released face
    columns = [*GALLERY_FIELDS, "word_count", "model_id"]
    for row in column_rows(CAPTIONS_PARQUET, columns):
        models["caption"][row["model_id"]] += 1
        if gallery_faces and row["face_id"] in released:
            shown[row["face_id"]] = {
                **{name: row[name] for name in GALLERY_FIELDS},
                "labels": valid_labels.get(row["face_id"], []),
            }
        lengths.append(row["word_count"])
        fidelity[row["fidelity"]] += 1
        sources[row["caption_source"]] += 1
        kinds = [("template", row["raw_text"])]
        if row["caption_source"] == "llm":
            kinds.append(("llm", row["caption"]))
        for kind, text in kinds:
            texts[kind] += 1
            sketches[kind].update(_gram_text(gram) for gram in ngrams(words(text)))
    scores, note = quality_sample(store, shard_id, released_face_ids, quality_crops)
    gallery, thumbnails = gallery_sample(store, shard_id, shown, gallery_faces)
    return {
        "format": STATS_FORMAT,
        "image_min_side": histogram(image_sides, SIDE_BINS),
        "face_min_side": histogram(face_sides, SIDE_BINS),
        "attributes": dict(sorted(labels.items())),
        "caption_words": histogram(lengths, WORD_BINS),
        "caption_sources": dict(sorted(sources.items())),
        "fidelity": dict(sorted(fidelity.items())),
        "ngrams": {
            kind: {"captions": texts[kind], "sketch": sketches[kind].to_text()}
            for kind in TEXT_KINDS
        },
        "quality": {"released": len(released_face_ids), "scores": scores, "note": note},
        "models": {stage: dict(sorted(ids.items())) for stage, ids in models.items()},
        "gallery": gallery,
        THUMBNAILS: thumbnails,
    }


def first_crops(
    store: ArtifactStore, shard_id: str, face_ids: Iterable[str], count: int
) -> Iterator[tuple[str, bytes]]:
    """`(face id, crop bytes)` of the first `count` of `face_ids` in the shard's `faces.tar`,
    which is read only as far as those."""
    wanted = {face_id.split("/", 1)[1]: face_id for face_id in face_ids}
    count = min(count, len(wanted))
    if not count:
        return
    found = 0
    with store.open(store.shard_path(shard_id, FACES_TAR)) as handle:
        for key, ext, payload in iter_webdataset(handle):
            if ext == "json" or key not in wanted:
                continue
            yield wanted[key], payload
            found += 1
            if found >= count:
                return


def quality_sample(
    store: ArtifactStore, shard_id: str, released_face_ids: list[str], crops: int
) -> tuple[list[list[Any]], str]:
    """BRISQUE scores `[face_id, score]` of the first `crops` released crops in `faces.tar`
    (read only as far as those), and a note when the model is unavailable."""
    from facecaption.release.quality import BrisqueModelError, ImageTooSmallError, brisque_score

    scores: list[list[Any]] = []
    try:
        for face_id, payload in first_crops(store, shard_id, released_face_ids, crops):
            with Image.open(io.BytesIO(payload)) as crop:
                try:
                    score = brisque_score(crop)
                except ImageTooSmallError:
                    score = math.nan
            if math.isfinite(score):
                scores.append([face_id, round(score, 4)])
    except BrisqueModelError as error:
        return [], str(error)
    return scores, ""


def gallery_sample(
    store: ArtifactStore, shard_id: str, shown: dict[str, dict[str, Any]], faces: int
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The first `faces` of the faces in `shown` (what the gallery shows of each, by face id)
    in `faces.tar` order, and each one's crop as a thumbnail, by face id."""
    gallery: list[dict[str, Any]] = []
    thumbnails: dict[str, str] = {}
    for face_id, payload in first_crops(store, shard_id, shown, faces):
        gallery.append(shown[face_id])
        thumbnails[face_id] = thumbnail(payload)
    return gallery, thumbnails


def thumbnail(crop: bytes) -> str:
    """A crop as a small JPEG data: URI."""
    with Image.open(io.BytesIO(crop)) as image:
        small = image.convert("RGB")
        small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=THUMBNAIL_JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def merge_stats(
    all_stats: Iterable[dict[str, Any]], max_crops: int, gallery_faces: int = 0
) -> dict[str, Any]:
    """The report's distributions over shards: histograms and counters summed, sketches
    merged, and at most `max_crops` of the scored crops and `gallery_faces` of the gallery
    candidates (without their thumbnails), each chosen by a hash of the face id."""
    image_sides = [0] * (len(SIDE_BINS) - 1)
    face_sides = [0] * (len(SIDE_BINS) - 1)
    caption_words = [0] * (len(WORD_BINS) - 1)
    labels: dict[str, int] = {}
    sources: dict[str, int] = {}
    fidelity: dict[str, int] = {}
    sketch_texts: dict[str, list[str]] = {kind: [] for kind in TEXT_KINDS}
    texts = dict.fromkeys(TEXT_KINDS, 0)
    candidates: list[tuple[bytes, float]] = []
    models: dict[str, dict[str, int]] = {stage: {} for stage in MODEL_STAGES}
    gallery: list[tuple[bytes, dict[str, Any]]] = []
    released = 0
    notes: set[str] = set()
    shards = 0
    sha256 = hashlib.sha256
    for stats in all_stats:
        shards += 1
        for total, part in (
            (image_sides, stats["image_min_side"]),
            (face_sides, stats["face_min_side"]),
            (caption_words, stats["caption_words"]),
        ):
            for index, count in enumerate(part):
                total[index] += count
        for counter, part in (
            (labels, stats["attributes"]),
            (sources, stats["caption_sources"]),
            (fidelity, stats["fidelity"]),
            *((models[stage], ids) for stage, ids in stats["models"].items()),
        ):
            for name, count in part.items():
                counter[name] = counter.get(name, 0) + count
        for kind in TEXT_KINDS:
            texts[kind] += stats["ngrams"][kind]["captions"]
            sketch_texts[kind].append(stats["ngrams"][kind]["sketch"])
        quality = stats["quality"]
        released += quality["released"]
        if quality["note"]:
            notes.add(quality["note"])
        candidates += [
            (sha256(face_id.encode()).digest(), score) for face_id, score in quality["scores"]
        ]
        gallery += [(sha256(face["face_id"].encode()).digest(), face) for face in stats["gallery"]]
    sketches = {kind: DistinctSketch() for kind in TEXT_KINDS}
    for kind in TEXT_KINDS:
        sketches[kind].merge_texts(sketch_texts[kind])
    quality_scores = [score for _, score in sorted(candidates)[:max_crops]]
    return {
        "shards": shards,
        "image_min_side": image_sides,
        "face_min_side": face_sides,
        "caption_words": caption_words,
        "attributes": {name: labels.get(name, 0) for name in CELEBA_ATTRIBUTES},
        "caption_sources": dict(sorted(sources.items())),
        "fidelity": dict(sorted(fidelity.items())),
        "unique_4grams": {
            kind: {"captions": texts[kind], "unique_4grams": sketches[kind].estimate()}
            for kind in TEXT_KINDS
        },
        "quality_scores": quality_scores,
        "quality_candidates": len(candidates),
        "released": released,
        "quality_note": "; ".join(sorted(notes)),
        "models": {
            stage: dict(sorted(ids.items(), key=lambda item: -item[1]))
            for stage, ids in models.items()
        },
        "gallery_faces": [face for _, face in sorted(gallery, key=lambda c: c[0])[:gallery_faces]],
        "gallery_candidates": len(gallery),
    }
