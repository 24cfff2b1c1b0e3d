"""Choosing and loading the face detector the settings ask for, and naming it.

`detector_identity` names the model without loading it (file name + sha256, or the cascade
and OpenCV version), so a stage fingerprint changes when the model does.
"""

from __future__ import annotations

from pathlib import Path

from facecaption.models.cache import ModelCache
from facecaption.models.detector import FaceDetector, ModelNotFoundError
from facecaption.settings import Settings
from facecaption.store import model_file_sha256

# Candidates come back down to these scores so that the stage can count what its own
# thresholds drop; they are not the keep thresholds (`min_score`, `cascade_min_score`).
INSIGHTFACE_CANDIDATE_SCORE = 0.5
CASCADE_CANDIDATE_SCORE = 0.0
# The cascade skips faces much smaller than the kept size: they would only be counted.
CASCADE_MIN_SIZE_FRACTION = 0.5


def detector_model_file(settings: Settings) -> Path:
    detect = settings.detect
    if detect.model_path:
        path = Path(detect.model_path).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"FACECAPTION_DETECT__MODEL_PATH names {path}: no such file")
        return path
    return ModelCache(settings.model_cache_dir).detector_file(detect.model_pack)


def detector_identity(settings: Settings) -> str:
    if settings.detect.backend == "cascade":
        from facecaption.models.cascade_detector import cascade_identity

        return cascade_identity()
    path = detector_model_file(settings)
    return f"{path.name}@sha256:{model_file_sha256(path)}"


def load_detector(settings: Settings) -> FaceDetector:
    detect = settings.detect
    if detect.backend == "cascade":
        from facecaption.models.cascade_detector import CascadeDetector

        return CascadeDetector(
            score_threshold=CASCADE_CANDIDATE_SCORE,
            min_size_px=max(1, int(detect.min_face_px * CASCADE_MIN_SIZE_FRACTION)),
        )
    from facecaption.models.insightface_detector import InsightFaceDetector

    return InsightFaceDetector(
        detector_model_file(settings),
        input_size=detect.input_size,
        batch_size=detect.batch_size,
        score_threshold=min(INSIGHTFACE_CANDIDATE_SCORE, detect.min_score),
        nms_threshold=detect.nms_threshold,
        providers=detect.providers,
    )
