"""Face alignment: synthetic faces (coloured blobs at known landmarks) land where they should."""

from __future__ import annotations

import re

import numpy as np
import pytest

from facecaption.detect import align
from facecaption.detect.align import (
    ARCFACE_TEMPLATE,
    MAX_CROP_SIDE,
    MIN_CROP_SIDE,
    TEMPLATE_SIDE,
    align_face,
    map_points,
)
from facecaption.detect.backends.base import FaceDetection

CANVAS_HEIGHT, CANVAS_WIDTH = 800, 1000
BLOB_COLOURS = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], dtype=np.float64
)
BLOB_SIGMA = 2.0  # source pixels at k = 1
CENTROID_TOLERANCE_PX = 1.5
TRANSFORM_TOLERANCE_PX = 0.5


def draw_blobs(points: np.ndarray, sigma: float, shape=(CANVAS_HEIGHT, CANVAS_WIDTH)) -> np.ndarray:
    """A black RGB canvas with one Gaussian blob per point, each in its own colour."""
    ys, xs = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    canvas = np.zeros((*shape, 3))
    for (x, y), colour in zip(points, BLOB_COLOURS, strict=False):
        canvas += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))[..., None] * colour
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def blob_near(crop: np.ndarray, point: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Intensity-weighted centroid and mean colour of the crop within `radius` of `point`."""
    ys, xs = np.mgrid[: crop.shape[0], : crop.shape[1]]
    window = (xs - point[0]) ** 2 + (ys - point[1]) ** 2 <= radius**2
    pixels = crop[window].astype(np.float64)
    weight = pixels.sum(axis=1)
    assert weight.sum() > 0, f"no blob near {point}"
    centroid = np.array([xs[window] @ weight, ys[window] @ weight]) / weight.sum()
    return centroid, pixels.sum(axis=0) / weight.sum()


def posed_landmarks(k: float, theta_deg: float, centre=(503.3, 397.6)) -> np.ndarray:
    """The template scaled by k, rotated by theta about its centre and moved to `centre`."""
    theta = np.deg2rad(theta_deg)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    offsets = (ARCFACE_TEMPLATE - ARCFACE_TEMPLATE.mean(axis=0)) * k
    return offsets @ rotation.T + np.asarray(centre)


def box_around(points: np.ndarray, margin: float) -> tuple[float, float, float, float]:
    x1, y1 = points.min(axis=0) - margin
    x2, y2 = points.max(axis=0) + margin
    return (float(x1), float(y1), float(x2), float(y2))


def assert_blobs_at(crop: np.ndarray, expected: np.ndarray, radius: float) -> None:
    for point, colour in zip(expected, BLOB_COLOURS, strict=True):
        centroid, mean_colour = blob_near(crop, point, radius)
        assert np.linalg.norm(centroid - point) < CENTROID_TOLERANCE_PX, (centroid, point)
        np.testing.assert_allclose(mean_colour, colour / colour.sum(), atol=0.1)


@pytest.mark.parametrize(
    ("k", "theta"), [(1.0, 0.0), (1.0, 30.0), (2.5, 0.0), (2.5, -30.0), (0.8, 30.0), (1.7, 75.0)]
)
def test_five_point_alignment_keeps_native_resolution_and_lands_on_template(
    k: float, theta: float
) -> None:
    landmarks = posed_landmarks(k, theta)
    image = draw_blobs(landmarks, BLOB_SIGMA * k)
    face = FaceDetection(box_around(landmarks, 20 * k), 0.99, landmarks.astype(np.float32))

    aligned = align_face(image, face)

    side = aligned.size
    assert aligned.method == "five_point"
    assert abs(side - TEMPLATE_SIDE * k) <= 1
    assert aligned.image.shape == (side, side, 3) and aligned.image.dtype == np.uint8
    expected = ARCFACE_TEMPLATE * side / TEMPLATE_SIDE
    mapped = map_points(landmarks.astype(np.float32), aligned.transform)
    np.testing.assert_allclose(mapped, expected, atol=TRANSFORM_TOLERANCE_PX)
    scale = np.sqrt(abs(np.linalg.det(aligned.transform[:, :2])))
    assert abs(scale - 1) < 1 / side
    assert_blobs_at(aligned.image, expected, radius=8 * side / TEMPLATE_SIDE)


def test_five_point_side_is_clamped_and_a_clamped_large_face_is_area_averaged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small_max_side = 128  # a 280 px face must shrink: exercises the area-averaging path
    monkeypatch.setattr(align, "MAX_CROP_SIDE", small_max_side)
    landmarks = posed_landmarks(2.5, 30.0)
    image = draw_blobs(landmarks, BLOB_SIGMA * 2.5)

    aligned = align_face(image, FaceDetection(box_around(landmarks, 50), 0.99, landmarks))

    assert aligned.size == small_max_side
    expected = ARCFACE_TEMPLATE * small_max_side / TEMPLATE_SIDE
    np.testing.assert_allclose(map_points(landmarks, aligned.transform), expected, atol=0.5)
    assert_blobs_at(aligned.image, expected, radius=8 * small_max_side / TEMPLATE_SIDE)


@pytest.mark.parametrize(("k", "side"), [(0.05, MIN_CROP_SIDE), (40.0, MAX_CROP_SIDE)])
def test_five_point_side_stays_within_bounds(k: float, side: int) -> None:
    landmarks = posed_landmarks(k, 10.0, centre=(50.0, 50.0))
    image = np.full((100, 100, 3), 200, dtype=np.uint8)

    aligned = align_face(image, FaceDetection(box_around(landmarks, 0), 0.99, landmarks))

    assert aligned.size == side and aligned.image.shape == (side, side, 3)
    expected = ARCFACE_TEMPLATE * side / TEMPLATE_SIDE
    np.testing.assert_allclose(map_points(landmarks, aligned.transform), expected, atol=0.5)


def test_two_eyes_give_a_horizontal_eye_line_at_native_scale() -> None:
    angle, distance = np.deg2rad(20.0), 60.0
    left_eye = np.array([400.0, 300.0])
    eyes = np.stack([left_eye, left_eye + distance * np.array([np.cos(angle), np.sin(angle)])])
    image = draw_blobs(eyes, BLOB_SIGMA)
    box = (350.0, 250.0, 500.0, 430.0)  # 150 wide, 180 high

    aligned = align_face(image, FaceDetection(box, 0.9, eyes.astype(np.float32)))

    assert aligned.method == "eye_line"
    assert aligned.size == 180 and aligned.image.shape == (180, 180, 3)
    np.testing.assert_allclose(map_points([[425.0, 340.0]], aligned.transform), [[90.0, 90.0]])
    expected = map_points(eyes, aligned.transform)
    centroids = [blob_near(aligned.image, point, 8)[0] for point in expected]
    assert abs(centroids[0][1] - centroids[1][1]) < 0.5
    assert abs(np.linalg.norm(centroids[1] - centroids[0]) - distance) < 1.0
    assert centroids[0][0] < centroids[1][0]  # the image-left eye stays on the left


@pytest.fixture
def noise_image() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (CANVAS_HEIGHT, CANVAS_WIDTH, 3), np.uint8)


def test_box_crop_copies_a_square_on_the_box_centre(noise_image: np.ndarray) -> None:
    aligned = align_face(noise_image, FaceDetection((100.0, 200.0, 180.0, 300.0), 0.9))

    assert aligned.method == "box" and aligned.size == 100
    np.testing.assert_array_equal(aligned.image, noise_image[200:300, 90:190])


def test_box_crop_past_the_image_edge_is_zero_outside(noise_image: np.ndarray) -> None:
    aligned = align_face(noise_image, FaceDetection((950.0, 760.0, 1050.0, 860.0), 0.9))

    assert aligned.size == 100
    np.testing.assert_array_equal(aligned.image[:40, :50], noise_image[760:, 950:])
    assert not aligned.image[40:].any() and not aligned.image[:, 50:].any()


def test_coinciding_landmarks_fall_back_to_the_box(noise_image: np.ndarray) -> None:
    same_point = np.full((5, 2), 140.0, dtype=np.float32)
    aligned = align_face(noise_image, FaceDetection((100.0, 100.0, 180.0, 180.0), 0.9, same_point))
    assert aligned.method == "box" and aligned.size == 80


def test_non_finite_landmarks_fall_back_to_the_box(noise_image: np.ndarray) -> None:
    landmarks = posed_landmarks(1.0, 0.0)
    landmarks[2] = np.nan
    aligned = align_face(noise_image, FaceDetection((450.0, 350.0, 560.0, 460.0), 0.9, landmarks))
    assert aligned.method == "box" and aligned.size == 110


def test_zero_width_box_uses_its_height(noise_image: np.ndarray) -> None:
    aligned = align_face(noise_image, FaceDetection((100.0, 100.0, 100.0, 160.0), 0.9))
    assert aligned.method == "box" and aligned.size == 60


def test_a_one_pixel_image_gives_a_minimum_size_crop() -> None:
    pixel = np.full((1, 1, 3), 255, dtype=np.uint8)
    landmarks = ARCFACE_TEMPLATE / TEMPLATE_SIDE  # a "face" inside one pixel
    for face in (
        FaceDetection((0.0, 0.0, 1.0, 1.0), 0.9),
        FaceDetection((0.0, 0.0, 1.0, 1.0), 0.9, landmarks),
    ):
        aligned = align_face(pixel, face)
        assert aligned.size == MIN_CROP_SIDE
        assert aligned.image.shape == (MIN_CROP_SIDE, MIN_CROP_SIDE, 3)


SMALL_IMAGE = np.zeros((10, 10, 3), np.uint8)
SMALL_FACE = FaceDetection((0, 0, 5, 5), 0.9)


@pytest.mark.parametrize(
    ("image", "face", "message"),
    [
        (np.zeros((10, 10), np.uint8), SMALL_FACE, "H x W x 3"),
        (np.zeros((0, 0, 3), np.uint8), SMALL_FACE, "H x W x 3"),
        (SMALL_IMAGE.astype(np.float32), SMALL_FACE, "H x W x 3"),
        (SMALL_IMAGE, FaceDetection((5, 5, 5, 5), 0.9), "no extent"),
        (SMALL_IMAGE, FaceDetection((0, 0, np.nan, 5), 0.9), "no extent"),
        (SMALL_IMAGE, FaceDetection((0, 0, 5, 5), 0.9, np.zeros((3, 2))), "(3, 2)"),
    ],
)
def test_malformed_input_raises_value_error(
    image: np.ndarray, face: FaceDetection, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        align_face(image, face)
