"""Detect: a shard's fetched images become aligned face crops (`faces.tar`) and one row per kept
face (`faces.parquet`).

Images stream out of `fetch.tar` (no extraction to disk; only rows fetch kept as `ok` are in
it, so failed and duplicate rows are skipped), are decoded upright (EXIF orientation applied),
and go to the detector in batches bounded by count and by pixels. An image is the input's: one
that cannot be decoded is counted by its reason (`decode_error`: truncated or corrupt,
`too_large`: over `detect.max_pixels`, `unsupported_mode`) and skipped; one whose EXIF
orientation cannot be followed is used as stored, counted as `exif_unreadable` or
`exif_orientation_invalid` (see `facecaption.core.imaging.exif_orientation`). Neither fails the
stage. Each detected face is kept
or dropped with a counted reason, in this order: `low_score` (below the backend's keep score),
`too_small` (a box side under `min_face_px`), `out_of_image` (less than
`MIN_INSIDE_FRACTION` of its box inside the image), `over_cap` (beyond `max_faces_per_image`,
best scores first). Kept faces are aligned (see `facecaption.detect.align`) and stored at native
resolution; boxes and landmarks are written in the pixels of the image as stored (before EXIF
orientation), with the orientation recorded, so they line up with the published URL's bytes.

Crops: PNG (lossless) by default, or JPEG quality 95 without chroma subsampling.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
from PIL import Image

from facecaption.core.artifacts import FACES_PARQUET, FACES_SCHEMA, FACES_TAR, FETCH_TAR
from facecaption.core.imaging import ImageDecodeError, UprightImage, decode_upright, upright_to_raw
from facecaption.core.stage import StageContext, StageInputs, StageResult, upstream_checksums
from facecaption.core.writers import WebDatasetWriter, iter_webdataset, write_parquet
from facecaption.detect.align import align_face
from facecaption.detect.backends import load_detector
from facecaption.detect.backends.base import FaceDetection, FaceDetector
from facecaption.models.identity import detector_identity
from facecaption.models.loaded import LOADED_MODELS, model_key
from facecaption.models.locate import detector_backend
from facecaption.settings import DetectSettings, Settings
from facecaption.state import Shard

MIN_INSIDE_FRACTION = 0.8
BATCH_PIXEL_BUDGET = 64_000_000  # decoded pixels held at once, whatever the batch size
PNG_COMPRESS_LEVEL = 3
JPEG_QUALITY = 95
BASE_COUNTS = ("images", "decode_error", "faces_detected", "faces_kept", "images_with_faces")


def fetched_images(tar_file: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) from a fetch tar, read as a stream."""
    for key, ext, payload in iter_webdataset(tar_file):
        if ext != "json":
            yield key, payload


def keep_score_for(backend: str, limits: DetectSettings) -> float:
    """The score a face needs: the cascade's level weight is its own scale; RetinaFace and
    SCRFD scores are probabilities, held to `min_score` (the paper's 0.98)."""
    return limits.cascade_min_score if backend == "cascade" else limits.min_score


def select_faces(
    faces: list[FaceDetection], width: int, height: int, limits: DetectSettings, backend: str
) -> tuple[list[FaceDetection], Counter[str]]:
    """The faces to keep (boxes clipped to the image) and why the others were dropped."""
    keep_score = keep_score_for(backend, limits)
    dropped: Counter[str] = Counter()
    kept = []
    for face in sorted(faces, key=lambda f: -f.score):
        x1, y1, x2, y2 = face.box
        inside_w = max(0.0, min(x2, width) - max(x1, 0.0))
        inside_h = max(0.0, min(y2, height) - max(y1, 0.0))
        area = max(face.width * face.height, 1e-9)
        if face.score < keep_score:
            dropped["low_score"] += 1
        elif min(face.width, face.height) < limits.min_face_px:
            dropped["too_small"] += 1
        elif inside_w * inside_h / area < MIN_INSIDE_FRACTION:
            dropped["out_of_image"] += 1
        elif limits.max_faces_per_image and len(kept) >= limits.max_faces_per_image:
            dropped["over_cap"] += 1
        else:
            clipped = (max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height))
            kept.append(FaceDetection(clipped, face.score, face.landmarks))
    return kept, dropped


def encode_crop(pixels: np.ndarray, crop_format: str) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if crop_format == "jpeg":
        image.save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0)
        return buffer.getvalue(), "jpg"
    image.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue(), "png"


def shard_detector(settings: Settings) -> FaceDetector:
    """The detector for a shard: loaded once per Airflow task; in a process that runs many
    shards (`facecaption run`), the one loaded for an earlier shard while it is the same
    model with the same settings (see `facecaption.models.loaded`)."""
    return LOADED_MODELS.get(
        "detector",
        model_key(detector_identity(settings), settings.detect),
        lambda: load_detector(settings),
    )


class DetectStage:
    name = "detect"
    # 2: orientation decided by `exif_orientation` for pixels and boxes alike
    version = "2"
    artifact_names = (FACES_TAR, FACES_PARQUET)
    cross_shard_inputs = ()

    def settings_inputs(self, settings: Settings) -> dict[str, Any]:
        # what runs, not how it was asked for: `auto` and an unset input size count as what
        # they resolve to (a pack installed later turns `auto` into insightface: stale)
        backend = detector_backend(settings)
        resolved = {"backend": backend, "input_size": settings.detect.input_side(backend)}
        return {
            "settings": {**settings.detect.output_settings(), **resolved},
            "model": detector_identity(settings),
        }

    def shard_inputs(self, shard: Shard, settings: Settings, inputs: StageInputs) -> dict[str, Any]:
        return {"fetch": upstream_checksums(inputs, shard.shard_id, "fetch")}

    def run(self, context: StageContext) -> StageResult:
        shard, store, limits = context.shard, context.store, context.settings.detect
        detector = shard_detector(context.settings)
        tar_path = store.shard_path(shard.shard_id, FACES_TAR)
        parquet_path = store.shard_path(shard.shard_id, FACES_PARQUET)
        counts: Counter[str] = Counter(dict.fromkeys(BASE_COUNTS, 0))
        rows: list[dict[str, Any]] = []
        with (
            store.open(store.shard_path(shard.shard_id, FETCH_TAR)) as source,
            store.publish(tar_path) as tmp_tar,
        ):
            with WebDatasetWriter(tmp_tar) as out:
                for batch in self._batches(fetched_images(source), limits, counts):
                    found = detector.detect([image.pixels for _, image in batch])
                    for (key, image), faces in zip(batch, found, strict=True):
                        rows += self._keep(shard, key, image, faces, detector, limits, out, counts)
                    context.progress(counts)
            tar_ref = store.describe(tar_path, tmp_tar)
        with store.publish(parquet_path) as tmp_parquet:
            write_parquet(rows, FACES_SCHEMA, tmp_parquet)
            parquet_ref = store.describe(parquet_path, tmp_parquet)
        return StageResult(
            counts=dict(sorted(counts.items())),
            artifacts={FACES_TAR: tar_ref, FACES_PARQUET: parquet_ref},
        )

    @staticmethod
    def _batches(
        images: Iterator[tuple[str, bytes]], limits: DetectSettings, counts: Counter[str]
    ) -> Iterator[list[tuple[str, UprightImage]]]:
        batch: list[tuple[str, UprightImage]] = []
        pixels = 0
        for key, body in images:
            counts["images"] += 1
            try:
                image = decode_upright(body, limits.max_pixels)
            except ImageDecodeError as error:
                counts[error.reason] += 1
                continue
            if image.orientation_problem:
                counts[image.orientation_problem] += 1
            batch.append((key, image))
            pixels += image.pixels.shape[0] * image.pixels.shape[1]
            if len(batch) >= limits.batch_size or pixels >= BATCH_PIXEL_BUDGET:
                yield batch
                batch, pixels = [], 0
        if batch:
            yield batch

    @staticmethod
    def _keep(
        shard: Shard,
        key: str,
        image: UprightImage,
        faces: list[FaceDetection],
        detector: FaceDetector,
        limits: DetectSettings,
        out: WebDatasetWriter,
        counts: Counter[str],
    ) -> list[dict[str, Any]]:
        height, width = image.pixels.shape[:2]
        kept, dropped = select_faces(faces, width, height, limits, detector.backend)
        counts["faces_detected"] += len(faces)
        counts.update({f"dropped_{reason}": n for reason, n in dropped.items()})
        counts["images_with_faces"] += bool(kept)
        rows = []
        for index, face in enumerate(kept):
            aligned = align_face(image.pixels, face)
            crop, ext = encode_crop(aligned.image, limits.crop_format)
            corners = upright_to_raw(
                np.array(face.box, dtype=np.float64).reshape(2, 2),
                image.orientation,
                image.raw_size,
            )
            (x1, y1), (x2, y2) = corners.min(axis=0), corners.max(axis=0)
            landmarks = (
                upright_to_raw(face.landmarks.astype(np.float64), image.orientation, image.raw_size)
                .ravel()
                .tolist()
                if face.landmarks is not None
                else []
            )
            face_key = f"{key}_{index:02d}"
            row = {
                "face_id": f"{shard.shard_id}/{face_key}",
                "key": key,
                "face_idx": index,
                "x1": int(np.floor(x1)),
                "y1": int(np.floor(y1)),
                "x2": int(np.ceil(x2)),
                "y2": int(np.ceil(y2)),
                "landmarks": landmarks,
                "score": float(face.score),
                "crop_width": int(aligned.image.shape[1]),
                "crop_height": int(aligned.image.shape[0]),
                "align_method": aligned.method,
                "image_width": image.raw_size[0],
                "image_height": image.raw_size[1],
                "exif_orientation": image.orientation,
                "detector_id": detector.detector_id,
            }
            out.write_json(face_key, crop, ext, row)
            rows.append(row)
            counts["faces_kept"] += 1
            counts[f"aligned_{aligned.method}"] += 1
        return rows
