"""Face alignment: one detected face -> one upright, square crop at the face's own resolution.

Owns the crop geometry only (no detection, no filtering, no file output). The method depends
on the landmarks the detector gave (see `facecaption.detect.backends.base.FaceDetection`):

- "five_point" (5 landmarks): insightface's 5-point similarity alignment. A least-squares
  similarity transform (rotation, uniform scale, translation; Umeyama 1991, no reflection)
  maps the landmarks onto `ARCFACE_TEMPLATE`. Unlike insightface we do not warp to 112 px:
  with s the scale of that fit, the crop side is S = round(112 / s) and the template is
  scaled by S / 112, so the transform's scale is ~1 and the crop keeps native resolution.
- "eye_line" (2 eye landmarks): rotate so the eye line is horizontal, scale 1, and centre a
  square of side max(box width, box height) on the (rotated) box centre.
- "box" (no landmarks): an unrotated square of side max(width, height) on the box centre.

Fallbacks: landmarks with a non-finite value are ignored (-> "box"); five landmarks that
(nearly) coincide give no scale to fit and two coinciding eyes no direction: both -> "box".
Every crop side is clamped to [MIN_CROP_SIDE, MAX_CROP_SIDE]: a clamped face is resampled to
fit, any other is at scale ~1. Sampling is bicubic (cv2.warpAffine); a crop that shrinks the
face a lot (only a clamped one) area-averages the source first. Pixels outside the source
image are 0. Malformed input (not a non-empty H x W x 3 uint8 image, a box with no extent or
non-finite corners, landmarks not (5, 2) or (2, 2)) raises ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facecaption.detect.backends.base import FaceDetection

# insightface's `arcface_dst` (insightface/utils/face_align.py), in 112 x 112 crop pixels.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
TEMPLATE_SIDE = 112  # the crop side ARCFACE_TEMPLATE is drawn for
MIN_CROP_SIDE = 16  # smaller faces carry nothing usable; keeps warps well defined
MAX_CROP_SIDE = 4096  # bounds memory for huge faces; larger ones are downsampled
_MIN_SPREAD_PX = 1e-3  # landmarks closer than this carry no scale or direction
# Bicubic sampling aliases once it shrinks by more than about 4/3; below that scale the source
# is area-averaged first (only clamped faces get there: native crops have scale ~1).
_AREA_AVERAGE_BELOW_SCALE = 0.75

FIVE_POINT, EYE_LINE, BOX = "five_point", "eye_line", "box"


@dataclass(frozen=True)
class AlignedFace:
    image: np.ndarray  # S x S x 3 uint8 RGB
    method: str  # FIVE_POINT, EYE_LINE or BOX
    transform: np.ndarray  # 2 x 3 affine, source image pixels -> crop pixels
    size: int  # S, the crop side


def map_points(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Apply a 2 x 3 affine transform to (n, 2) points."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ transform[:, :2].T + transform[:, 2]


def align_face(image: np.ndarray, face: FaceDetection) -> AlignedFace:
    """Crop `face` out of `image` (H x W x 3 uint8 RGB) upright; see the module docstring."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or image.size == 0:
        raise ValueError(f"expected a non-empty H x W x 3 uint8 image, got {image.shape}")
    box = np.asarray(face.box, dtype=np.float64)
    box_side = max(face.width, face.height)
    if not np.all(np.isfinite(box)) or box_side <= 0:
        raise ValueError(f"face box {face.box} has no extent")
    centre = (box[:2] + box[2:]) / 2
    landmarks = _usable_landmarks(face.landmarks)
    if landmarks is not None and len(landmarks) == 5:
        fit = _similarity(landmarks, ARCFACE_TEMPLATE)
        if fit is not None:
            side = _clamp_side(TEMPLATE_SIDE / _scale(fit))
            return _warp(image, fit * (side / TEMPLATE_SIDE), side, FIVE_POINT)
    if landmarks is not None:
        eye_vector = landmarks[1] - landmarks[0]
        if np.hypot(*eye_vector) > _MIN_SPREAD_PX:
            angle = np.arctan2(eye_vector[1], eye_vector[0])
            return _centred(image, centre, box_side, -angle, EYE_LINE)
    return _centred(image, centre, box_side, 0.0, BOX)


def _usable_landmarks(landmarks: np.ndarray | None) -> np.ndarray | None:
    if landmarks is None:
        return None
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape not in ((5, 2), (2, 2)):
        raise ValueError(f"expected (5, 2) or (2, 2) landmarks, got {points.shape}")
    return points if np.all(np.isfinite(points)) else None


def _similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    """Umeyama's least-squares similarity source -> target as 2 x 3, or None if degenerate."""
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_centred, target_centred = source - source_mean, target - target_mean
    source_variance = (source_centred**2).sum() / len(source)
    if source_variance < _MIN_SPREAD_PX**2:
        return None
    covariance = target_centred.T @ source_centred / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    reflection = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ reflection @ vt
    scale = np.trace(np.diag(singular) @ reflection) / source_variance
    linear = scale * rotation
    return np.hstack([linear, (target_mean - linear @ source_mean)[:, None]])


def _scale(transform: np.ndarray) -> float:
    return float(np.sqrt(abs(np.linalg.det(transform[:, :2]))))


def _clamp_side(side: float) -> int:
    return int(np.clip(round(side), MIN_CROP_SIDE, MAX_CROP_SIDE))


def _centred(
    image: np.ndarray, centre: np.ndarray, box_side: float, angle: float, method: str
) -> AlignedFace:
    """Rotate by `angle` (radians) and map `centre` to the middle of a square crop."""
    side = _clamp_side(box_side)
    scale = side / box_side if box_side > MAX_CROP_SIDE or box_side < MIN_CROP_SIDE else 1.0
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    linear = np.array([[cos, -sin], [sin, cos]])
    offset = side / 2 - linear @ centre
    if angle == 0.0 and scale == 1.0:
        offset = np.round(offset)  # whole-pixel shift: the crop copies pixels exactly
    return _warp(image, np.hstack([linear, offset[:, None]]), side, method)


def _warp(image: np.ndarray, transform: np.ndarray, side: int, method: str) -> AlignedFace:
    """Warp with bicubic sampling; a clearly shrinking transform first area-averages the source."""
    # Imported here: the stage registry imports this module, and a fetch-only worker (no `cpu`
    # or `gpu` extra) has no OpenCV.
    import cv2

    source, sampling = image, transform
    scale = _scale(transform)
    if scale < _AREA_AVERAGE_BELOW_SCALE:
        height, width = image.shape[:2]
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        source = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        fx, fy = size[0] / width, size[1] / height
        # cv2.resize maps pixel centres x -> (x + 0.5) * f - 0.5; undo that before `transform`.
        unshrink = np.array([[1 / fx, 0, 0.5 / fx - 0.5], [0, 1 / fy, 0.5 / fy - 0.5], [0, 0, 1]])
        sampling = transform @ unshrink
    crop = cv2.warpAffine(
        source,
        sampling,
        (side, side),
        flags=cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    return AlignedFace(image=crop, method=method, transform=transform, size=side)
