"""Export: one shard's contribution to the release.

`release.parquet` holds one row per kept, captioned face with FaceCaption-15M's columns
(`url`, `box` as [x1, y1, x2, y2] integer pixels of the original image, `laion_caption` and
`caption` as lists of strings, as in FaceCaption-v2) plus ours: a stable face id, the source
sample id, score, landmarks, valid attributes, raw grammar text, where the caption came from,
the model ids, the fingerprint of this export and a license note. With
`export.training_shards`, `train.tar` holds the webdataset sample `{key}.jpg` (aligned crop),
`{key}.txt` (caption) and `{key}.json` (the row) of each face.

Rows under a takedown (their URL or image sha256 was requested, or they were matched by the
takedown DAG) are left out; the fingerprint covers the recorded matches, so a takedown makes
exactly the affected shards stale. `facecaption.release.publish` assembles shard exports into files.

Export joins rows of four stages, so it checks that they fit together before it writes: each
stage must have run on the outputs its input stage holds now (else that stage is stale:
StageInputError from the fingerprint, before anything runs), every file must have the checksum
and the columns recorded for it, and every caption must have its face, attributes and fetched
image. A shard that fails these is not exported (StageInputError, a permanent error: running
the earlier stages again fixes it), and the release leaves it out with the reason.

The export also works out the shard's statistics for the dataset report once
(`facecaption.release.stats`), from the same checked input files; they are stored with its
state, not as an artifact.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
from PIL import Image

from facecaption.core.artifacts import (
    ATTRIBUTES_PARQUET,
    ATTRIBUTES_SCHEMA,
    CAPTIONS_PARQUET,
    CAPTIONS_SCHEMA,
    FACES_PARQUET,
    FACES_SCHEMA,
    FACES_TAR,
    FETCH_PARQUET,
    FETCH_SCHEMA,
    RELEASE_PARQUET,
    RELEASE_SCHEMA,
    TRAIN_TAR,
)
from facecaption.core.redaction import redact_userinfo
from facecaption.core.stage import (
    StageContext,
    StageInputError,
    StageInputs,
    StageResult,
    upstream_chain,
)
from facecaption.core.store import ArtifactChecksumError
from facecaption.core.writers import WebDatasetWriter, iter_webdataset, write_parquet
from facecaption.release.stats import shard_stats
from facecaption.settings import Settings
from facecaption.state import Shard
from facecaption.state.takedowns import TakedownIndex


def training_key(face_id: str) -> str:
    """A webdataset key for a face id (`{shard}/{row}_{face}`): no '/' and no '.'."""
    return face_id.replace("/", "_")


# the stages whose outputs an export joins, each the input of the next
UPSTREAM = ("fetch", "detect", "attribute", "caption")
FACE_COLUMNS = [
    "face_id", "key", "x1", "y1", "x2", "y2", "landmarks", "score", "crop_width",
    "crop_height", "image_width", "image_height", "detector_id",
]  # fmt: skip


# each parquet input: the stage that wrote it, its schema
INPUT_TABLES = {
    FETCH_PARQUET: ("fetch", FETCH_SCHEMA),
    FACES_PARQUET: ("detect", FACES_SCHEMA),
    ATTRIBUTES_PARQUET: ("attribute", ATTRIBUTES_SCHEMA),
    CAPTIONS_PARQUET: ("caption", CAPTIONS_SCHEMA),
}


class InputTables:
    """The parquet artifacts an export reads, each read once, whole, and checked against the
    checksum its fingerprint covers; the release rows and the report statistics are made from
    the same checked bytes."""

    def __init__(self, context: StageContext) -> None:
        self.context = context
        self._tables: dict[str, pa.Table] = {}

    def rows(self, name: str, columns: list[str]) -> list[dict[str, Any]]:
        """`columns` of the input artifact `name`, checked against its schema as well;
        StageInputError when missing, changed, unreadable or lacking."""
        stage, schema = INPUT_TABLES[name]
        store, shard_id = self.context.store, self.context.shard.shard_id
        table = self._tables.get(name)
        if table is None:
            try:
                table = store.read_table(
                    store.shard_path(shard_id, name), sha256=self.context.inputs[stage][name]
                )
            except (OSError, pa.ArrowException, ArtifactChecksumError) as error:
                raise StageInputError(
                    f"{name} of shard {shard_id} cannot be used: {error}"
                ) from error
            self._tables[name] = table
        for column in columns:
            expected = schema.field(column).type
            index = table.schema.get_field_index(column)
            if index < 0 or not table.schema.field(index).type.equals(expected):
                raise StageInputError(
                    f"{name} of shard {shard_id} has no column {column} of type {expected}"
                )
        return table.select(columns).to_pylist()


def _mismatch(shard_id: str, what: str) -> StageInputError:
    return StageInputError(
        f"the outputs of shard {shard_id} do not fit together: {what}; run detect and the"
        " stages after it again"
    )


def taken_down_keys(
    takedowns: TakedownIndex | None, shard_id: str, fetched: dict[str, dict[str, Any]]
) -> set[str]:
    """Source row keys of this shard that must not be released: matched by the takedown DAG,
    or whose URL or sha256 is under a request not applied yet."""
    if takedowns is None:
        return set()
    keys = {key for _, key in takedowns.shard_matches(shard_id)}
    urls = takedowns.blocked("url", [row["url"] for row in fetched.values() if row["url"]])
    shas = takedowns.blocked("sha256", [r["sha256"] for r in fetched.values() if r["sha256"]])
    keys.update(key for key, row in fetched.items() if row["url"] in urls or row["sha256"] in shas)
    return keys


class ExportStage:
    name = "export"
    version = "1"
    artifact_names = (RELEASE_PARQUET, TRAIN_TAR)  # TRAIN_TAR with export.training_shards
    cross_shard_inputs = ()

    def settings_inputs(self, settings: Settings) -> dict[str, Any]:
        return {"settings": settings.export.output_settings()}

    def shard_inputs(self, shard: Shard, settings: Settings, inputs: StageInputs) -> dict[str, Any]:
        upstream: dict[str, Any] = upstream_chain(inputs, shard.shard_id, UPSTREAM)
        if not settings.export.training_shards:
            upstream["detect"].pop(FACES_TAR, None)  # crops matter only to training shards
        return {**upstream, "takedowns": inputs.takedown_matches(shard.shard_id)}

    def run(self, context: StageContext) -> StageResult:
        shard, store, limits = context.shard, context.store, context.settings.export
        tables = InputTables(context)
        fetched = {
            row["key"]: row
            for row in tables.rows(
                FETCH_PARQUET, ["key", "url", "caption", "sample_id", "sha256", "status"]
            )
            if row["status"] == "ok"
        }
        faces = {row["face_id"]: row for row in tables.rows(FACES_PARQUET, FACE_COLUMNS)}
        attributes = {
            row["face_id"]: row
            for row in tables.rows(ATTRIBUTES_PARQUET, ["face_id", "valid_labels", "model_id"])
        }
        captions = tables.rows(
            CAPTIONS_PARQUET,
            ["face_id", "raw_text", "caption", "caption_source", "fidelity", "model_id"],
        )
        blocked = taken_down_keys(context.takedowns, shard.shard_id, fetched)
        counts: Counter[str] = Counter(captioned=0, released=0, taken_down=0)
        rows = []
        for caption in captions:
            counts["captioned"] += 1
            face = faces.get(caption["face_id"])
            if face is None:
                raise _mismatch(
                    shard.shard_id,
                    f"face {caption['face_id']} has a caption but no row in {FACES_PARQUET}",
                )
            if caption["face_id"] not in attributes:
                raise _mismatch(
                    shard.shard_id, f"face {caption['face_id']} has a caption but no attributes"
                )
            if face["key"] not in fetched:
                raise _mismatch(
                    shard.shard_id,
                    f"face {face['face_id']} is on row {face['key']}, which is not an ok image"
                    f" in {FETCH_PARQUET}",
                )
            if face["key"] in blocked:
                counts["taken_down"] += 1
                continue
            rows.append(
                release_row(
                    face,
                    fetched[face["key"]],
                    attributes[caption["face_id"]],
                    caption,
                    context.fingerprint,
                    limits.license,
                )  # fmt: skip
            )
        counts["released"] = len(rows)
        counts["images"] = len({row["sample_id"] or row["url"] for row in rows})
        path = store.shard_path(shard.shard_id, RELEASE_PARQUET)
        with store.publish(path) as tmp:
            write_parquet(rows, RELEASE_SCHEMA, tmp)
            artifacts = {RELEASE_PARQUET: store.describe(path, tmp)}
        if limits.training_shards:
            tar_path = store.shard_path(shard.shard_id, TRAIN_TAR)
            crops_path = store.shard_path(shard.shard_id, FACES_TAR)
            try:
                with (
                    store.open_checked(crops_path, context.inputs["detect"][FACES_TAR]) as crops,
                    store.publish(tar_path) as tmp_tar,
                ):
                    counts["training_samples"] = write_training_shard(
                        rows, crops, tmp_tar, limits.jpeg_quality
                    )
                    artifacts[TRAIN_TAR] = store.describe(tar_path, tmp_tar)
            except (FileNotFoundError, tarfile.TarError, ArtifactChecksumError) as error:
                raise StageInputError(
                    f"{FACES_TAR} of shard {shard.shard_id} cannot be used: {error}"
                ) from error
        try:
            stats = shard_stats(
                store, shard.shard_id, [row["face_id"] for row in rows],
                limits.quality_crops_per_shard, limits.gallery_faces_per_shard, read=tables.rows,
            )  # fmt: skip
        except (OSError, tarfile.TarError) as error:  # faces.tar: quality sample, thumbnails
            raise StageInputError(
                f"{FACES_TAR} of shard {shard.shard_id} cannot be used: {error}"
            ) from error
        return StageResult(counts=dict(sorted(counts.items())), artifacts=artifacts, stats=stats)


def release_row(
    face: dict[str, Any],
    fetched: dict[str, Any],
    attributes: dict[str, Any],
    caption: dict[str, Any],
    fingerprint: str,
    license_note: str,
) -> dict[str, Any]:
    return {
        # fetch refuses URLs with credentials; a fetch made before it did may still hold one
        "url": redact_userinfo(fetched["url"]),
        "box": [face["x1"], face["y1"], face["x2"], face["y2"]],
        "laion_caption": [fetched["caption"]] if fetched["caption"] is not None else [],
        "caption": [caption["caption"]],
        "face_id": face["face_id"],
        "sample_id": fetched["sample_id"],
        "shard_id": face["face_id"].split("/", 1)[0],
        "image_sha256": fetched["sha256"],
        "image_width": face["image_width"],
        "image_height": face["image_height"],
        "score": face["score"],
        "landmarks": face["landmarks"],
        "crop_width": face["crop_width"],
        "crop_height": face["crop_height"],
        "attributes": attributes["valid_labels"],
        "raw_text": caption["raw_text"],
        "caption_source": caption["caption_source"],
        "fidelity": caption["fidelity"],
        "detector_id": face["detector_id"],
        "attribute_model_id": attributes["model_id"],
        "caption_model_id": caption["model_id"],
        "fingerprint": fingerprint,
        "license": license_note,
    }


def write_training_shard(
    rows: list[dict[str, Any]], crops: IO[bytes], path: Path, jpeg_quality: int
) -> int:
    """`{key}.jpg|txt|json` per released face, streamed in crop order (the order of the
    rows), crops re-encoded as JPEG (kept as they are when detect already wrote JPEG)."""
    wanted = {row["face_id"].split("/", 1)[1]: row for row in rows}
    with WebDatasetWriter(path) as tar:
        for face_key, ext, payload in iter_webdataset(crops):
            row = wanted.get(face_key)
            if row is None or ext == "json":
                continue
            tar.write(
                training_key(row["face_id"]),
                {
                    "jpg": payload if ext == "jpg" else _jpeg(payload, jpeg_quality),
                    "txt": row["caption"][0].encode(),
                    "json": json.dumps(row, sort_keys=True).encode(),
                },
            )
        return tar.samples


def _jpeg(payload: bytes, quality: int) -> bytes:
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(payload)) as image:
        image.convert("RGB").save(buffer, "JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()
