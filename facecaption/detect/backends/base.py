"""The face detector interface: what every backend returns and promises.

A detector takes RGB uint8 images (H x W x 3, already upright: EXIF orientation applied) and
returns, per image, the faces it found with boxes and landmarks in that image's pixels.
Landmarks follow insightface's order: left eye, right eye, nose, left mouth corner, right
mouth corner, where left and right are as seen in the image (the subject's right eye is the
image's left eye). A backend that finds fewer points returns those it has, in that order
(the cascade returns the two eyes, or none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class FaceDetection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the input image's pixels
    score: float  # backend-specific: comparable only within one backend
    landmarks: np.ndarray | None = None  # (k, 2) float32, k in {5, 2}, or None

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


class FaceDetector(Protocol):
    detector_id: str  # model file name and sha256, or the cascade's; recorded per face
    backend: str  # "retinaface", "insightface" or "cascade"

    def detect(self, images: list[np.ndarray]) -> list[list[FaceDetection]]:
        """Faces per image, best score first. Batches when the model allows it."""
        ...
