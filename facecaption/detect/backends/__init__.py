"""Face detector backends behind one interface (`base.FaceDetector`): the packaged RetinaFace
(`retinaface`, the offline default), insightface packs (`insightface`, production) and OpenCV's
cascade (`cascade`), and the router that loads the one the settings ask for (`auto`: see
`facecaption.models.locate.detector_backend`). Their names (`detector_id`) come from
`facecaption.models.identity`, the same function the detect fingerprint uses."""

from __future__ import annotations

from facecaption.detect.backends.base import FaceDetector
from facecaption.models.locate import detector_backend, detector_model_file
from facecaption.settings import Settings

# Candidates come back down to these scores so that the stage can count what its own
# thresholds drop; they are not the keep thresholds (`min_score`, `cascade_min_score`).
ONNX_CANDIDATE_SCORE = 0.5
CASCADE_CANDIDATE_SCORE = 0.0
# The cascade skips faces much smaller than the kept size: they would only be counted.
CASCADE_MIN_SIZE_FRACTION = 0.5


def load_detector(settings: Settings) -> FaceDetector:
    detect = settings.detect
    backend = detector_backend(settings)
    if backend == "cascade":
        from facecaption.detect.backends.cascade import CascadeDetector

        return CascadeDetector(
            score_threshold=CASCADE_CANDIDATE_SCORE,
            min_size_px=max(1, int(detect.min_face_px * CASCADE_MIN_SIZE_FRACTION)),
        )
    options = {
        "input_size": detect.input_side(backend),
        "batch_size": detect.batch_size,
        "score_threshold": min(ONNX_CANDIDATE_SCORE, detect.min_score),
        "nms_threshold": detect.nms_threshold,
        "providers": detect.providers,
    }
    if backend == "retinaface":
        from facecaption.detect.backends.retinaface import RetinaFaceDetector

        return RetinaFaceDetector(**options)
    from facecaption.detect.backends.insightface import InsightFaceDetector

    return InsightFaceDetector(detector_model_file(settings), **options)
