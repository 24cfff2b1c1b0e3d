"""The insightface detector backend: a RetinaFace/SCRFD ONNX file, decoded by insightface.

insightface's router (`insightface.model_zoo.get_model`) picks the model class from the file's
inputs and outputs; a plain local `.onnx` path loads offline, with no download, license or
signature step. Models with a dynamic batch axis run `batch_size` letterboxed images per
session call, decoded slice by slice exactly as insightface's `SCRFD.forward`/`detect` would;
others go through the model's own `detect`, one image at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from insightface.model_zoo import SCRFD, get_model
from insightface.model_zoo.scrfd import distance2bbox, distance2kps

from facecaption.detect.backends.base import FaceDetection
from facecaption.models.errors import ModelNotFoundError
from facecaption.models.identity import file_identity
from facecaption.models.runtime import default_providers


class InsightFaceDetector:
    backend = "insightface"

    def __init__(
        self,
        model_file: Path,
        *,
        input_size: int = 640,
        batch_size: int = 8,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        providers: list[str] | None = None,
    ) -> None:
        model_file = Path(model_file)
        if not model_file.is_file():
            raise ModelNotFoundError(
                f"no detector model at {model_file}: run `facecaption models pull detector`,"
                " or use the packaged offline RetinaFace:"
                " FACECAPTION_DETECT__BACKEND=retinaface"
            )
        self.detector_id = file_identity(model_file)
        model = get_model(str(model_file), providers=providers or default_providers())
        if not isinstance(model, SCRFD):
            raise ValueError(f"{model_file} is not a face detector insightface can decode")
        fixed = model.static_input_size
        if fixed is not None and fixed != (input_size, input_size):
            raise ValueError(
                f"{model_file.name} takes {fixed[0]}x{fixed[1]} input only;"
                f" set FACECAPTION_DETECT__INPUT_SIZE={fixed[0]}"
            )
        model.prepare(0, nms_thresh=nms_threshold, det_thresh=score_threshold)
        self._model = model
        self.input_size = input_size
        self.batch_size = batch_size
        self.score_threshold = score_threshold
        # A fixed batch of 1 (or 2-D outputs) means the graph takes one image per call.
        self.batched = bool(model.batched) and model.input_shape[0] != 1

    def detect(self, images: list[np.ndarray]) -> list[list[FaceDetection]]:
        for image in images:
            _check_rgb(image)
        if not self.batched:
            return [self._detect_one(_to_bgr(image)) for image in images]
        results: list[list[FaceDetection]] = []
        for start in range(0, len(images), self.batch_size):
            results.extend(self._detect_batch(images[start : start + self.batch_size]))
        return results

    def _detect_one(self, image: np.ndarray) -> list[FaceDetection]:
        if _letterbox_size(image.shape, self.input_size) is None:
            return []
        size = (self.input_size, self.input_size)
        dets, kpss = self._model.detect(image, input_size=size, det_thresh=self.score_threshold)
        return _detections(dets, kpss)

    def _detect_batch(self, images: list[np.ndarray]) -> list[list[FaceDetection]]:
        """One session call for the batch; mirrors `SCRFD._detect_candidates` per image.
        Works on the RGB images directly (insightface swaps BGR to RGB in its blob)."""
        model, side = self._model, self.input_size
        canvases, scales = [], []
        for image in images:
            fit = _letterbox_size(image.shape, side)
            canvas = np.zeros((side, side, 3), np.uint8)
            if fit is not None:
                new_width, new_height, det_scale = fit
                canvas[:new_height, :new_width] = cv2.resize(image, (new_width, new_height))
            canvases.append(canvas)
            scales.append(None if fit is None else fit[2])
        blob = cv2.dnn.blobFromImages(
            canvases,
            1.0 / model.input_std,
            (side, side),
            (model.input_mean,) * 3,
            swapRB=False,
        ).astype(getattr(model, "input_dtype", np.float32), copy=False)
        outputs = model.session.run(model.output_names, {model.input_name: blob})
        return [
            [] if scale is None else self._decode(outputs, index, scale)
            for index, scale in enumerate(scales)
        ]

    def _decode(
        self, outputs: list[np.ndarray], index: int, det_scale: float
    ) -> list[FaceDetection]:
        model, fmc = self._model, self._model.fmc
        scores_list, boxes_list, kpss_list = [], [], []
        for level, (stride, centers) in enumerate(self._anchor_centers()):
            scores = outputs[level][index]
            keep = np.where(scores >= self.score_threshold)[0]  # decode candidates only
            boxes = distance2bbox(centers[keep], outputs[level + fmc][index][keep] * stride)
            scores_list.append(scores[keep])
            boxes_list.append(boxes)
            if model.use_kps:
                kpss = distance2kps(centers[keep], outputs[level + 2 * fmc][index][keep] * stride)
                kpss_list.append(kpss.reshape((kpss.shape[0], kpss.shape[1] // 2, 2)))
        scores = np.vstack(scores_list)
        if scores.size == 0:
            return []
        order = np.argsort(-scores.ravel(), kind="stable")
        dets = np.hstack((np.vstack(boxes_list) / det_scale, scores)).astype(np.float32)[order]
        kpss = (np.vstack(kpss_list) / det_scale)[order] if model.use_kps else None
        keep = model.nms(dets)
        return _detections(dets[keep], None if kpss is None else kpss[keep])

    def _anchor_centers(self) -> Iterator[tuple[int, np.ndarray]]:
        """(stride, anchor centres) per feature level, as `SCRFD.forward` lays them out."""
        model = self._model
        for stride in model._feat_stride_fpn:
            cells = self.input_size // stride
            key = (cells, cells, stride)
            if key not in model.center_cache:
                grid = np.stack(np.mgrid[:cells, :cells][::-1], axis=-1).astype(np.float32)
                centers = (grid * stride).reshape((-1, 2))
                centers = np.repeat(centers, model._num_anchors, axis=0)
                model.center_cache[key] = centers
            yield stride, model.center_cache[key]


def _check_rgb(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected RGB uint8 H x W x 3, got {image.dtype} {image.shape}")


def _to_bgr(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, :, ::-1])


def _letterbox_size(shape: tuple[int, ...], side: int) -> tuple[int, int, float] | None:
    """(width, height, det_scale) of the image inside the side x side input, as insightface
    computes it; None when a side would round to 0 px (nothing there to detect)."""
    height, width = shape[:2]
    if height / width > 1:
        new_height, new_width = side, int(side / (height / width))
    else:
        new_width, new_height = side, int(side * (height / width))
    if new_width < 1 or new_height < 1:
        return None
    return new_width, new_height, new_height / height


def _detections(dets: np.ndarray, kpss: np.ndarray | None) -> list[FaceDetection]:
    return [
        FaceDetection(
            box=tuple(float(v) for v in det[:4]),
            score=float(det[4]),
            landmarks=None if kpss is None else np.asarray(kpss[i], np.float32),
        )
        for i, det in enumerate(dets)
    ]
