"""Attribute: every aligned face of a shard gets the 40 CelebA probabilities and a consistent
label set (`attributes.parquet`, one row per face; see `facecaption.attribute.labels` for the
rules).

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
from typing import IO, Any

import numpy as np
from PIL import Image

from facecaption.attribute.backends import AttributeModel, load_attribute_model
from facecaption.attribute.labels import CELEBA_ATTRIBUTES, label_set
from facecaption.core.artifacts import ATTRIBUTES_PARQUET, ATTRIBUTES_SCHEMA, FACES_TAR
from facecaption.core.stage import StageContext, StageInputs, StageResult, upstream_checksums
from facecaption.core.writers import iter_webdataset, write_parquet
from facecaption.models.identity import attribute_identity
from facecaption.models.loaded import LOADED_MODELS, model_key
from facecaption.models.locate import attribute_model
from facecaption.settings import Settings
from facecaption.state import Shard


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


def shard_attribute_model(settings: Settings) -> AttributeModel:
    """The attribute model for a shard: loaded once per Airflow task; in a process that runs
    many shards (`facecaption run`), the one loaded for an earlier shard while it is the same
    model with the same settings (see `facecaption.models.loaded`)."""
    return LOADED_MODELS.get(
        "attribute",
        model_key(attribute_identity(settings), settings.attribute),
        lambda: load_attribute_model(settings),
    )


class AttributeStage:
    name = "attribute"
    version = "1"
    artifact_names = (ATTRIBUTES_PARQUET,)
    cross_shard_inputs = ()

    def settings_inputs(self, settings: Settings) -> dict[str, Any]:
        located = attribute_model(settings)  # `auto` counts as the backend it resolves to
        return {
            "settings": {**settings.attribute.output_settings(), "backend": located.backend},
            "model": attribute_identity(settings, located),
        }

    def shard_inputs(self, shard: Shard, settings: Settings, inputs: StageInputs) -> dict[str, Any]:
        return {"detect": upstream_checksums(inputs, shard.shard_id, "detect")}

    def run(self, context: StageContext) -> StageResult:
        shard, store, limits = context.shard, context.store, context.settings.attribute
        model = shard_attribute_model(context.settings)
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
                context.progress(counts)
        path = store.shard_path(shard.shard_id, ATTRIBUTES_PARQUET)
        with store.publish(path) as tmp:
            write_parquet(rows, ATTRIBUTES_SCHEMA, tmp)
            ref = store.describe(path, tmp)
        return StageResult(counts=dict(counts), artifacts={ATTRIBUTES_PARQUET: ref})
