"""Attribute: every aligned face of a shard gets the 40 CelebA probabilities and a consistent
label set (`attributes.parquet`, one row per face; see `facecaption.attributes` for the rules).

Faces stream out of `faces.tar` in batches of the model's batch size; the crops are not
written again. A face is `kept` when it has at least `min_labels` valid labels after
contradictions are resolved; the others stay in the file with `kept = false`, so the
thresholds can be studied without re-running the model.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
from PIL import Image

from facecaption.attributes import CELEBA_ATTRIBUTES, label_set
from facecaption.models.attribute_model import OnnxAttributeModel
from facecaption.models.cache import ModelCache
from facecaption.models.detector import ModelNotFoundError
from facecaption.settings import Settings
from facecaption.stages import StageContext, StageResult, upstream_checksums
from facecaption.stages.detect import TAR_NAME as FACES_TAR
from facecaption.state import Shard, ShardState
from facecaption.store import model_file_sha256, sha256_file
from facecaption.writers import iter_webdataset, write_parquet

PARQUET_NAME = "attributes.parquet"

ATTRIBUTES_SCHEMA = pa.schema(
    [
        ("face_id", pa.string()),
        *[(f"p_{name}", pa.float32()) for name in CELEBA_ATTRIBUTES],
        ("valid_labels", pa.list_(pa.string())),
        ("dropped_labels", pa.list_(pa.string())),
        ("flagged_labels", pa.list_(pa.string())),
        ("label_count", pa.int16()),
        ("kept", pa.bool_()),
        ("model_id", pa.string()),
    ]
)


def attribute_model_file(settings: Settings) -> Path:
    """The configured model's .onnx (its sidecar beside it), or a ModelNotFoundError."""
    if settings.attribute.model_path:
        path = Path(settings.attribute.model_path).expanduser()
    else:
        path = ModelCache(settings.model_cache_dir).attribute_model(settings.attribute.model)
    if not path.is_file() or not path.with_suffix(".json").is_file():
        raise ModelNotFoundError(
            f"no attribute model at {path} (+ {path.with_suffix('.json').name}): export one"
            " with `facecaption models export-attributes CHECKPOINT` or pull one with"
            " `facecaption models pull attributes --url ...`, or set"
            " FACECAPTION_ATTRIBUTE__MODEL_PATH to an .onnx with its sidecar"
        )
    return path


def face_crops(tar_file: IO[bytes]) -> Iterator[tuple[str, np.ndarray]]:
    """(face_id, RGB crop) from a faces tar, read as a stream (image, then its json)."""
    pending: dict[str, bytes] = {}
    for key, ext, payload in iter_webdataset(tar_file):
        if ext != "json":
            pending[key] = payload
            continue
        meta = json.loads(payload)
        with Image.open(io.BytesIO(pending.pop(key))) as crop:
            yield meta["face_id"], np.asarray(crop.convert("RGB"))


def _batches(faces: Iterator[tuple[str, np.ndarray]], size: int) -> Iterator[list]:
    batch: list[tuple[str, np.ndarray]] = []
    for face in faces:
        batch.append(face)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class AttributeStage:
    name = "attribute"
    version = "1"
    artifact_names = (PARQUET_NAME,)

    def fingerprint_inputs(
        self, shard: Shard, settings: Settings, state: ShardState
    ) -> dict[str, Any]:
        upstream = upstream_checksums(state, shard.shard_id, "detect")  # first: inputs exist
        model = attribute_model_file(settings)
        return {
            "detect": upstream,
            "settings": settings.attribute.output_settings(),
            "model": f"{model.name}@sha256:{model_file_sha256(model)}",
            "sidecar": sha256_file(model.with_suffix(".json")),
        }

    def run(self, context: StageContext) -> StageResult:
        shard, store, limits = context.shard, context.store, context.settings.attribute
        model = OnnxAttributeModel(
            attribute_model_file(context.settings),
            batch_size=limits.batch_size,
            providers=limits.providers,
        )
        counts: Counter[str] = Counter(faces=0, kept=0, contradictions=0)
        rows: list[dict[str, Any]] = []
        with store.open(store.shard_path(shard.shard_id, FACES_TAR)) as source:
            for batch in _batches(face_crops(source), model.batch_size):
                probabilities = model.predict([crop for _, crop in batch])
                for (face_id, _), row in zip(batch, probabilities, strict=True):
                    labels = label_set(
                        dict(zip(CELEBA_ATTRIBUTES, row.tolist(), strict=True)),
                        limits.threshold,
                        limits.min_labels,
                    )
                    counts["faces"] += 1
                    counts["kept"] += labels.kept
                    counts["contradictions"] += len(labels.dropped)
                    rows.append(
                        {
                            "face_id": face_id,
                            **{
                                f"p_{n}": float(p)
                                for n, p in zip(CELEBA_ATTRIBUTES, row, strict=True)
                            },
                            "valid_labels": list(labels.valid),
                            "dropped_labels": list(labels.dropped),
                            "flagged_labels": list(labels.flagged),
                            "label_count": len(labels.valid),
                            "kept": labels.kept,
                            "model_id": model.model_id,
                        }
                    )
        path = store.shard_path(shard.shard_id, PARQUET_NAME)
        with store.publish(path) as tmp:
            write_parquet(rows, ATTRIBUTES_SCHEMA, tmp)
            ref = store.describe(path, tmp)
        return StageResult(counts=dict(counts), artifacts={PARQUET_NAME: ref})
