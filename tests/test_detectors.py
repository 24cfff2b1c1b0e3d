"""The detector backends on their own: insightface's SCRFD decoding through a real ONNX model
whose answer is known (tests/scrfd_model.py), and OpenCV's cascade on real photos."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
from scrfd_model import build_scrfd_onnx
from support.sampledata import package_file

from facecaption.detect.backends.base import FaceDetection
from facecaption.detect.backends.cascade import CascadeDetector
from facecaption.detect.backends.insightface import InsightFaceDetector
from facecaption.models.errors import ModelNotFoundError

INPUT_SIDE = 640
# Faces in detector-input pixels (the letterboxed 640 x 640 square), as the fake model reports.
FACE = {
    "box": (100.0, 80.0, 228.0, 240.0),
    "kps": [(140.0, 140.0), (190.0, 142.0), (165.0, 175.0), (145.0, 205.0), (186.0, 207.0)],
    "score": 0.99,
}
SMALL_FACE = {  # found at stride 8, top right of the input
    "box": (400.0, 40.0, 440.0, 90.0),
    "kps": [(410.0, 55.0), (430.0, 55.0), (420.0, 65.0), (412.0, 78.0), (428.0, 78.0)],
    "score": 0.8,
    "stride": 8,
}
BIG_FACE = {  # found at stride 32, lower half
    "box": (200.0, 300.0, 520.0, 620.0),
    "kps": [(300.0, 420.0), (420.0, 420.0), (360.0, 480.0), (310.0, 540.0), (410.0, 540.0)],
    "score": 0.6,
    "stride": 32,
}


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def insightface_scale(height: int, width: int) -> float:
    """The letterbox scale insightface's SCRFD uses: the long side fills the input, and the
    scale is taken from the (integer) resized height."""
    if height > width:
        return INPUT_SIDE / height
    return int(INPUT_SIDE * height / width) / height


def as_arrays(faces: list[FaceDetection]) -> list[tuple[np.ndarray, float, np.ndarray]]:
    return [(np.array(face.box), face.score, face.landmarks) for face in faces]


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# --- insightface backend -------------------------------------------------------------------


def test_insightface_maps_a_letterboxed_face_back_to_image_pixels(tmp_path):
    model = build_scrfd_onnx(tmp_path / "scrfd.onnx", [FACE])
    detector = InsightFaceDetector(model, providers=["CPUExecutionProvider"])
    wide, tall = rgb(720, 1280), rgb(960, 480)  # scales 0.5 and 2/3: long side fills 640
    [[face], [tall_face]] = detector.detect([wide, tall])
    np.testing.assert_allclose(face.box, np.array(FACE["box"]) * 2, atol=1e-3)
    np.testing.assert_allclose(face.landmarks, np.array(FACE["kps"]) * 2, atol=1e-3)
    np.testing.assert_allclose(tall_face.box, np.array(FACE["box"]) * 1.5, atol=1e-3)
    assert face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
    assert face.landmarks[0, 0] < face.landmarks[1, 0]  # left eye, right eye, as given
    assert face.score == pytest.approx(0.99)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    assert detector.detector_id == f"scrfd.onnx@sha256:{digest}"
    assert detector.backend == "insightface" and not detector.batched


def test_insightface_batched_and_single_image_models_agree(tmp_path):
    faces = [FACE, SMALL_FACE, BIG_FACE]
    single = InsightFaceDetector(
        build_scrfd_onnx(tmp_path / "single.onnx", faces), score_threshold=0.5
    )
    batched = InsightFaceDetector(
        build_scrfd_onnx(tmp_path / "batched.onnx", faces, batched=True),
        batch_size=2,  # 3 images: a full batch and a partial one
        score_threshold=0.5,
    )
    assert batched.batched and not single.batched
    images = [rgb(720, 1280, 1), rgb(960, 480, 2), rgb(333, 500, 3)]
    from_single, from_batched = single.detect(images), batched.detect(images)
    for image, one, many in zip(images, from_single, from_batched, strict=True):
        scale = insightface_scale(*image.shape[:2])
        assert [face.score for face in one] == pytest.approx([0.99, 0.8, 0.6])  # best first
        for face, given in zip(one, faces, strict=True):
            np.testing.assert_allclose(face.box, np.array(given["box"]) / scale, rtol=1e-5)
            np.testing.assert_allclose(face.landmarks, np.array(given["kps"]) / scale, rtol=1e-5)
        for (box, score, kps), (box_b, score_b, kps_b) in zip(
            as_arrays(one), as_arrays(many), strict=True
        ):
            np.testing.assert_allclose(box_b, box, rtol=1e-6)
            np.testing.assert_allclose(kps_b, kps, rtol=1e-6)
            assert score_b == pytest.approx(score)


@pytest.mark.parametrize("batched", [False, True])
def test_insightface_score_threshold_and_nms_filter_faces(tmp_path, batched):
    overlapping = {**FACE, "box": (104.0, 84.0, 232.0, 244.0), "score": 0.9, "stride": 8}
    model = build_scrfd_onnx(
        tmp_path / "scrfd.onnx", [FACE, overlapping, SMALL_FACE, BIG_FACE], batched=batched
    )
    strict = InsightFaceDetector(model, score_threshold=0.7)
    [faces] = strict.detect([rgb(640, 640)])
    # BIG_FACE is under the threshold; the overlapping 0.9 box loses to FACE in NMS
    assert [face.score for face in faces] == pytest.approx([0.99, 0.8])
    loose = InsightFaceDetector(model, score_threshold=0.5, nms_threshold=0.99)
    [faces] = loose.detect([rgb(640, 640)])
    assert [face.score for face in faces] == pytest.approx([0.99, 0.9, 0.8, 0.6])


@pytest.mark.parametrize("batched", [False, True])
def test_insightface_odd_images_do_not_crash(tmp_path, batched):
    detector = InsightFaceDetector(
        build_scrfd_onnx(tmp_path / "scrfd.onnx", [FACE], batched=batched)
    )
    deep = np.linspace(0, 65535, 200 * 300, dtype=np.uint16).reshape(200, 300)
    from_16_bit = np.repeat((deep >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    tiny, sliver = np.zeros((1, 1, 3), np.uint8), np.zeros((2, 3000, 3), np.uint8)
    results = detector.detect([tiny, sliver, from_16_bit])
    # 1 x 1 fills the whole input (scale 640); a 2 px sliver rounds to 0 rows: nothing to see
    np.testing.assert_allclose(results[0][0].box, np.array(FACE["box"]) / INPUT_SIDE, rtol=1e-5)
    assert results[1] == [] and len(results[2]) == 1
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect([deep])


def test_insightface_missing_model_points_to_pull_and_retinaface(tmp_path):
    with pytest.raises(ModelNotFoundError, match="facecaption models pull") as raised:
        InsightFaceDetector(tmp_path / "det_10g.onnx")
    assert "FACECAPTION_DETECT__BACKEND=retinaface" in str(raised.value)


def test_insightface_rejects_an_input_size_the_model_cannot_take(tmp_path):
    model = build_scrfd_onnx(tmp_path / "scrfd.onnx", [FACE])
    with pytest.raises(ValueError, match="INPUT_SIZE=640"):
        InsightFaceDetector(model, input_size=320)


# --- cascade backend -----------------------------------------------------------------------

# Faces in insightface's t1.jpg (1280 x 886) found by eye: x1, y1, x2, y2.
T1_FACES = [
    (1113, 276, 1234, 397),
    (867, 61, 1009, 203),
    (732, 357, 845, 470),
    (449, 273, 588, 412),
]
ASTRONAUT_FACE = (170, 60, 260, 150)


def photo(package: str, relative: str) -> np.ndarray:
    path = package_file(package, relative)
    assert path is not None, f"{package} does not ship {relative}"
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def cascade() -> CascadeDetector:
    return CascadeDetector()


def test_cascade_finds_the_faces_in_a_group_photo(cascade):
    group = photo("insightface", "data/images/t1.jpg")
    doubled = cv2.resize(group, None, fx=2, fy=2)  # 2560 px: downscaled inside, boxes scaled back
    faces, faces_doubled = cascade.detect([group, doubled])
    assert len(faces) >= 4
    for found in (
        faces,
        [FaceDetection(tuple(v / 2 for v in f.box), f.score) for f in faces_doubled],
    ):
        for known in T1_FACES:
            assert max(iou(known, face.box) for face in found) > 0.5, known
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    for face in faces:  # two eye windows on one eye are no landmarks
        eyes = face.landmarks
        assert eyes is None or eyes[1, 0] - eyes[0, 0] > face.width / 4
    assert all(face.score >= 3.0 for face in faces)
    assert cascade.detector_id == f"opencv-haarcascade_frontalface_default@{cv2.__version__}"


def test_cascade_finds_the_astronaut_and_her_eyes(cascade):
    [faces] = cascade.detect([photo("skimage", "data/astronaut.png")])
    best = faces[0]
    assert iou(best.box, ASTRONAUT_FACE) > 0.5
    x1, y1, x2, y2 = best.box
    eyes = best.landmarks
    assert eyes is not None and eyes.shape == (2, 2)
    assert eyes[0, 0] < (x1 + x2) / 2 < eyes[1, 0]  # image-left eye first
    assert np.all((y1 < eyes[:, 1]) & (eyes[:, 1] < (y1 + y2) / 2))


def test_cascade_finds_nothing_where_there_is_no_face(cascade):
    noise = rgb(480, 640, 7)
    gradient = np.repeat(np.linspace(0, 255, 640, dtype=np.uint8)[None, :, None], 3, axis=2)
    gradient = np.repeat(gradient, 480, axis=0)
    flat = np.full((300, 400, 3), 128, np.uint8)
    assert cascade.detect([noise, gradient, flat]) == [[], [], []]


def test_cascade_threshold_and_odd_images(cascade):
    astronaut = photo("skimage", "data/astronaut.png")
    [loose] = CascadeDetector(score_threshold=-10.0).detect([astronaut])
    [none] = CascadeDetector(score_threshold=100.0).detect([astronaut])
    [default] = cascade.detect([astronaut])
    assert len(loose) > len(default) >= 1 and none == []
    deep = np.linspace(0, 65535, 200 * 300, dtype=np.uint16).reshape(200, 300)
    from_16_bit = np.repeat((deep >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    odd = [np.zeros((1, 1, 3), np.uint8), np.zeros((2, 3000, 3), np.uint8), from_16_bit]
    assert cascade.detect(odd) == [[], [], []]
    with pytest.raises(ValueError, match="RGB uint8"):
        cascade.detect([deep])
