"""The retinaface detector backend: the packaged RetinaFace (MobileNet-0.25, 5 landmarks), run
by onnxruntime and decoded here. Offline: the ONNX file ships inside this package
(`retinaface.onnx`; where it comes from and its MIT notice: `retinaface.NOTICE`).

The model (biubug6/Pytorch_Retinaface layout) takes `input` [N, 3, H, W] float32: BGR pixels
minus the training mean (104, 117, 123), every axis dynamic. It answers, per prior, `loc`
[N, P, 4] box offsets, `conf` [N, P, 2] softmaxed (background, face) and `landmarks`
[N, P, 10]. Priors are laid out level by level (strides 8, 16, 32, anchor sides 16/32,
64/128, 256/512 px), row by row, column by column, the two sides innermost; a prior is
(cx, cy, side, side) with cx = (column + 0.5) * stride. Decoding, with variances 0.1 and 0.2:
centre = prior centre + loc[:2] * 0.1 * side, size = side * exp(loc[2:] * 0.2), each landmark
= prior centre + offset * 0.1 * side. Candidates at or above `score_threshold` go through
greedy IoU non-maximum suppression (no +1 pixel term).

Every image is letterboxed into one `input_size` square (the image at the top left, shrunk
with area averaging to fit, never enlarged: a small photo's face enlarged past the largest
anchor gets junk boxes; the rest is the mean colour, i.e. zero input), so a batch is one
session call and a face's answer does not depend on its batch neighbours. Boxes and
landmarks are mapped back to the image's pixels by each axis's own scale.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from facecaption.detect.backends.base import FaceDetection
from facecaption.models.identity import file_identity
from facecaption.models.runtime import default_providers

PACKAGED_MODEL = Path(__file__).with_name("retinaface.onnx")
STRIDES = (8, 16, 32)
ANCHOR_SIDES = ((16, 32), (64, 128), (256, 512))
CENTER_VARIANCE, SIZE_VARIANCE = 0.1, 0.2
MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)  # biubug6's training mean
PAD_RGB = tuple(int(v) for v in MEAN_BGR[::-1])  # letterbox padding: zero after the mean
LANDMARKS = 5
MAX_CANDIDATES = 5000  # best-scoring candidates that go to NMS: bounds its work on noise


@functools.lru_cache(maxsize=8)
def priors(side: int) -> np.ndarray:
    """(P, 3) prior centre x, centre y and side in input pixels, for a side x side input."""
    levels = []
    for stride, sides in zip(STRIDES, ANCHOR_SIDES, strict=True):
        cells = -(-side // stride)  # ceil: the model pads the last row and column
        rows, columns = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        centres = np.stack([(columns + 0.5) * stride, (rows + 0.5) * stride], axis=-1)
        centres = np.repeat(centres.reshape(-1, 1, 2), len(sides), axis=1)
        anchor = np.broadcast_to(np.array(sides, np.float64)[None, :, None], (cells**2, 2, 1))
        levels.append(np.concatenate([centres, anchor], axis=-1).reshape(-1, 3))
    return np.concatenate(levels).astype(np.float32)


def letterbox(image: np.ndarray, side: int) -> tuple[np.ndarray, float, float]:
    """The image in a side x side canvas (top left, shrunk to fit, never enlarged) and the
    x and y scales from image pixels to canvas pixels."""
    height, width = image.shape[:2]
    scale = min(1.0, side / max(height, width))
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    if (new_width, new_height) != (width, height):
        # Imported here: the plan task reads PACKAGED_MODEL (the detect stage's identity) on
        # the default queue, where a fetch-only worker has no OpenCV.
        import cv2

        image = cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_AREA)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = PAD_RGB
    canvas[:new_height, :new_width] = image
    return canvas, new_width / width, new_height / height


def to_blob(canvases: list[np.ndarray]) -> np.ndarray:
    """RGB uint8 canvases -> N x 3 x H x W float32, BGR minus the mean."""
    batch = np.stack(canvases)[..., ::-1].astype(np.float32) - MEAN_BGR
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best score first."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        width = np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest])
        height = np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest])
        inter = np.clip(width, 0, None) * np.clip(height, 0, None)
        iou = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-12)
        order = rest[iou <= threshold]
    return keep


class RetinaFaceDetector:
    backend = "retinaface"

    def __init__(
        self,
        model_file: Path = PACKAGED_MODEL,
        *,
        input_size: int = 1024,
        batch_size: int = 8,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        providers: list[str] | None = None,
    ) -> None:
        import onnxruntime

        self.detector_id = file_identity(Path(model_file))
        # Providers always explicit: with none given, onnxruntime-gpu would run on CPU only.
        self.session = onnxruntime.InferenceSession(
            str(model_file), providers=providers or default_providers()
        )
        self._input_name = self.session.get_inputs()[0].name
        self.input_size = input_size
        self.batch_size = batch_size
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold

    def detect(self, images: list[np.ndarray]) -> list[list[FaceDetection]]:
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected RGB uint8 H x W x 3, got {image.dtype} {image.shape}")
        results: list[list[FaceDetection]] = []
        for start in range(0, len(images), self.batch_size):
            results += self._detect_batch(images[start : start + self.batch_size])
        return results

    def _detect_batch(self, images: list[np.ndarray]) -> list[list[FaceDetection]]:
        boxed = [letterbox(image, self.input_size) for image in images]
        loc, conf, landmarks = self.session.run(
            None, {self._input_name: to_blob([canvas for canvas, _, _ in boxed])}
        )
        anchors = priors(self.input_size)
        if loc.shape[1] != len(anchors):
            raise ValueError(
                f"the model answered {loc.shape[1]} priors for a {self.input_size} px input,"
                f" expected {len(anchors)}: not a RetinaFace of this layout"
            )
        return [
            self._decode(loc[i], conf[i, :, 1], landmarks[i], anchors, sx, sy)
            for i, (_, sx, sy) in enumerate(boxed)
        ]

    def _decode(
        self,
        loc: np.ndarray,
        scores: np.ndarray,
        landmarks: np.ndarray,
        anchors: np.ndarray,
        scale_x: float,
        scale_y: float,
    ) -> list[FaceDetection]:
        candidates = np.flatnonzero(scores >= self.score_threshold)
        if candidates.size == 0:
            return []
        candidates = candidates[np.argsort(-scores[candidates], kind="stable")][:MAX_CANDIDATES]
        anchor = anchors[candidates].astype(np.float64)
        centre, side = anchor[:, :2], anchor[:, 2:]
        offsets = loc[candidates].astype(np.float64)
        box_centre = centre + offsets[:, :2] * CENTER_VARIANCE * side
        box_size = side * np.exp(offsets[:, 2:] * SIZE_VARIANCE)
        boxes = np.concatenate([box_centre - box_size / 2, box_centre + box_size / 2], axis=1)
        points = landmarks[candidates].astype(np.float64).reshape(-1, LANDMARKS, 2)
        points = centre[:, None, :] + points * CENTER_VARIANCE * side[:, None, :]
        keep = nms(boxes, scores[candidates], self.nms_threshold)
        unscale = np.array([scale_x, scale_y])
        return [
            FaceDetection(
                box=tuple(float(v) for v in boxes[i] / np.tile(unscale, 2)),
                score=float(scores[candidates[i]]),
                landmarks=(points[i] / unscale).astype(np.float32),
            )
            for i in keep
        ]
