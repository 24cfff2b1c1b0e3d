"""The cascade detector backend: OpenCV's Haar frontal-face cascade, CPU only and offline.

A face's score is its level weight from `detectMultiScale3(..., outputRejectLevels=True)`:
the boosted sum of the cascade's last stage for the best window of its group. Every window
that passes the cascade has one at or above that stage's threshold (about -3 for
`haarcascade_frontalface_default.xml`); higher means more face-like. It is unbounded, not a
probability, and not comparable to insightface's scores (the paper's 0.98): it has its own
threshold setting, `detect.cascade_min_score`.

Landmarks are the two eyes, found with `haarcascade_eye.xml` in the upper half of each face
box, image-left first, when exactly two are found a plausible distance apart; otherwise None.
"""

from __future__ import annotations

import cv2
import numpy as np

from facecaption.detect.backends.base import FaceDetection
from facecaption.models.identity import cascade_identity

FACE_CASCADE = "haarcascade_frontalface_default.xml"
EYE_CASCADE = "haarcascade_eye.xml"
MAX_SIDE_PX = 1280  # larger images are downscaled first: the cascade's cost grows with area
SCALE_FACTOR = 1.05  # pyramid step; 1.1 is twice as fast but misses tilted faces
MIN_NEIGHBORS = 5  # overlapping windows a face needs; fewer lets hands and textures in
EYE_MIN_NEIGHBORS = 3
EYE_MIN_FRACTION = 1 / 8  # eye window size bounds, as a fraction of the face width
EYE_MAX_FRACTION = 1 / 2
EYE_MIN_SEPARATION_FRACTION = 1 / 4  # of the face width; real eyes sit about 0.4 apart
EYES = 2


class CascadeDetector:
    backend = "cascade"

    def __init__(self, *, score_threshold: float = 3.0, min_size_px: int = 48) -> None:
        self.detector_id = cascade_identity()
        self.score_threshold = score_threshold
        self.min_size_px = min_size_px
        self._faces = _load_cascade(FACE_CASCADE)
        self._eyes = _load_cascade(EYE_CASCADE)

    def detect(self, images: list[np.ndarray]) -> list[list[FaceDetection]]:
        return [self._detect_one(image) for image in images]

    def _detect_one(self, image: np.ndarray) -> list[FaceDetection]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected RGB uint8 H x W x 3, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        scale = min(1.0, MAX_SIDE_PX / max(height, width))
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        min_side = max(1, round(self.min_size_px * scale))
        if min(gray.shape) < min_side:
            return []
        boxes, _levels, weights = self._faces.detectMultiScale3(
            gray,
            scaleFactor=SCALE_FACTOR,
            minNeighbors=MIN_NEIGHBORS,
            minSize=(min_side, min_side),
            outputRejectLevels=True,
        )
        faces = [
            FaceDetection(
                box=tuple(float(v / scale) for v in (x, y, x + w, y + h)),
                score=float(weight),
                landmarks=self._eye_centers(gray, (x, y, w, h), scale),
            )
            for (x, y, w, h), weight in zip(boxes, np.ravel(weights), strict=True)
            if weight >= self.score_threshold
        ]
        return sorted(faces, key=lambda face: -face.score)

    def _eye_centers(
        self, gray: np.ndarray, box: tuple[int, int, int, int], scale: float
    ) -> np.ndarray | None:
        x, y, w, h = (int(v) for v in box)
        upper_half = gray[y : y + h // 2, x : x + w]
        eyes = self._eyes.detectMultiScale(
            upper_half,
            scaleFactor=SCALE_FACTOR,
            minNeighbors=EYE_MIN_NEIGHBORS,
            minSize=(max(1, int(w * EYE_MIN_FRACTION)),) * 2,
            maxSize=(max(1, int(w * EYE_MAX_FRACTION)),) * 2,
        )
        if len(eyes) != EYES:
            return None
        centers = sorted((x + ex + ew / 2, y + ey + eh / 2) for ex, ey, ew, eh in eyes)
        # Two windows on one eye are not two eyes.
        if centers[1][0] - centers[0][0] < w * EYE_MIN_SEPARATION_FRACTION:
            return None
        return np.array(centers, np.float32) / scale


def _load_cascade(name: str) -> cv2.CascadeClassifier:
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + name)
    if cascade.empty():
        raise FileNotFoundError(f"OpenCV's {name} is missing from {cv2.data.haarcascades}")
    return cascade
