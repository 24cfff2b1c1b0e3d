"""The packaged RetinaFace backend on the packaged photos: faces and landmarks found, five-point
alignment, batches that change nothing, the same answer as a reference decoding written here
from the published algorithm, and the detect stage keeping real faces offline."""

from __future__ import annotations

import hashlib
import itertools

import cv2
import numpy as np
import onnxruntime
import pyarrow.parquet as pq
import pytest
from support.sampledata import package_file, packaged_photos
from support.samplesite import SampleSite
from test_detect import _fetch_and_detect
from test_fetch import routes_source

from facecaption.detect.align import FIVE_POINT, align_face
from facecaption.detect.backends import load_detector
from facecaption.detect.backends.base import FaceDetection
from facecaption.detect.backends.retinaface import PACKAGED_MODEL, RetinaFaceDetector
from facecaption.detect.stage import select_faces
from facecaption.models.identity import detector_identity
from facecaption.settings import DetectSettings, Settings

CPU = ["CPUExecutionProvider"]
MODEL_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"
NO_FACES = ("coffee.png", "chelsea.png", "rocket.jpg")


def photo(name: str) -> np.ndarray:
    path = packaged_photos()[name]
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def detector() -> RetinaFaceDetector:
    return RetinaFaceDetector(providers=CPU)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: photo(name) for name in packaged_photos()}


# --- a reference decoding, from biubug6/Pytorch_Retinaface (PriorBox, box_utils.decode,
# decode_landm, py_cpu_nms), written independently of the backend -------------------------


def reference_detect(session, image: np.ndarray, side: int, threshold: float, nms: float):
    height, width = image.shape[:2]
    scale = min(1.0, side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale < 1 else image
    canvas = np.zeros((side, side, 3), np.float32)
    canvas[: size[1], : size[0]] = resized[:, :, ::-1].astype(np.float32) - (104, 117, 123)
    loc, conf, landms = session.run(None, {"input": canvas.transpose(2, 0, 1)[None].copy()})
    anchors = []
    for step, min_sizes in zip((8, 16, 32), ((16, 32), (64, 128), (256, 512)), strict=True):
        cells = int(np.ceil(side / step))
        for i, j in itertools.product(range(cells), range(cells)):
            for min_size in min_sizes:
                anchors.append(
                    [(j + 0.5) * step / side, (i + 0.5) * step / side, min_size / side,
                     min_size / side]
                )  # fmt: skip
    priors = np.array(anchors)
    loc, landms, scores = loc[0].astype(np.float64), landms[0].astype(np.float64), conf[0][:, 1]
    centres = priors[:, :2] + loc[:, :2] * 0.1 * priors[:, 2:]
    boxes = np.concatenate((centres, priors[:, 2:] * np.exp(loc[:, 2:] * 0.2)), axis=1)
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    points = np.concatenate(
        [priors[:, :2] + landms[:, 2 * k : 2 * k + 2] * 0.1 * priors[:, 2:] for k in range(5)],
        axis=1,
    )
    boxes, points = boxes * side, points * side
    keep = scores >= threshold
    boxes, points, scores = boxes[keep], points[keep], scores[keep]
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = scores.argsort(kind="stable")[::-1]
    chosen = []
    while order.size > 0:
        i = order[0]
        chosen.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]))
        overlap = w * h / (areas[i] + areas[order[1:]] - w * h)
        order = order[np.where(overlap <= nms)[0] + 1]
    sx, sy = size[0] / width, size[1] / height
    return [
        (boxes[i] / [sx, sy, sx, sy], float(scores[i]), points[i].reshape(5, 2) / [sx, sy])
        for i in chosen
    ]


# --- the backend -------------------------------------------------------------------------


def test_the_packaged_model_is_the_wheels_bytes(detector):
    assert hashlib.sha256(PACKAGED_MODEL.read_bytes()).hexdigest() == MODEL_SHA256
    assert detector.detector_id == f"retinaface.onnx@sha256:{MODEL_SHA256}"
    notice = PACKAGED_MODEL.with_name("retinaface.NOTICE").read_text()
    assert "Copyright (c) 2025 ddfabbro" in notice and MODEL_SHA256 in notice


def test_retinaface_finds_the_faces_of_the_packaged_photos(detector, photos):
    found = dict(zip(photos, detector.detect(list(photos.values())), strict=True))
    confident = {name: [f for f in faces if f.score >= 0.98] for name, faces in found.items()}
    assert len(confident["astronaut.png"]) == 1
    for name in NO_FACES:
        assert confident[name] == [], name
    if "t1.jpg" in photos:  # six people, two of them with tilted heads
        assert len(confident["t1.jpg"]) == 6
    for name, faces in confident.items():
        for face in faces:
            x1, y1, x2, y2 = face.box
            eyes, nose, mouth = face.landmarks[:2], face.landmarks[2], face.landmarks[3:]
            assert face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
            assert eyes[0, 0] < eyes[1, 0] and mouth[0, 0] < mouth[1, 0], name  # image-left first
            assert eyes[:, 1].max() < nose[1] < mouth[:, 1].min(), name
            assert np.all((x1 < face.landmarks[:, 0]) & (face.landmarks[:, 0] < x2)), name
            assert np.all((y1 < face.landmarks[:, 1]) & (face.landmarks[:, 1] < y2)), name
            aligned = align_face(photos[name], face)
            assert aligned.method == FIVE_POINT, name
    # the astronaut's face, as scikit-image's docs place it
    (x1, y1, x2, y2) = confident["astronaut.png"][0].box
    assert x1 < 215 < x2 and y1 < 105 < y2


def test_batch_of_one_and_batch_of_eight_give_identical_faces(photos):
    images = list(photos.values()) + [photo("astronaut.png")[::-1].copy()]
    one = RetinaFaceDetector(batch_size=1, providers=CPU).detect(images)
    eight = RetinaFaceDetector(batch_size=8, providers=CPU).detect(images)
    assert sum(len(faces) for faces in one) >= 3
    for single, batched in zip(one, eight, strict=True):
        assert [f.box for f in single] == [f.box for f in batched]
        assert [f.score for f in single] == [f.score for f in batched]
        for a, b in zip(single, batched, strict=True):
            np.testing.assert_array_equal(a.landmarks, b.landmarks)


@pytest.mark.parametrize("side", [640, 1024])
def test_retinaface_equals_the_reference_decoding(photos, side):
    session = onnxruntime.InferenceSession(str(PACKAGED_MODEL), providers=CPU)
    detector = RetinaFaceDetector(input_size=side, score_threshold=0.5, providers=CPU)
    images = {**photos, "tall.png": np.ascontiguousarray(photo("astronaut.png")[:, 100:400])}
    for name, faces in zip(images, detector.detect(list(images.values())), strict=True):
        expected = reference_detect(session, images[name], side, 0.5, 0.4)
        assert len(faces) == len(expected), name
        for face, (box, score, points) in zip(faces, expected, strict=True):
            np.testing.assert_allclose(face.box, box, rtol=1e-5, atol=1e-3)
            assert face.score == pytest.approx(score, abs=1e-7)
            np.testing.assert_allclose(face.landmarks, points, rtol=1e-5, atol=1e-3)


def test_small_images_are_not_enlarged_and_odd_images_do_not_crash(detector):
    hanks = package_file("insightface", "data/images/Tom_Hanks_54745.png")
    if hanks is None:
        pytest.skip("insightface's sample images are not installed")
    crop = cv2.cvtColor(cv2.imread(str(hanks)), cv2.COLOR_BGR2RGB)  # a 112 px aligned face
    [[face]] = [[f for f in faces if f.score >= 0.98] for faces in detector.detect([crop])]
    assert face.width < 112 and face.landmarks is not None
    tiny, sliver = np.zeros((1, 1, 3), np.uint8), np.zeros((2, 3000, 3), np.uint8)
    assert detector.detect([tiny, sliver]) == [[], []]
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect([np.zeros((10, 10), np.uint8)])


# --- in the pipeline ---------------------------------------------------------------------


def test_retinaface_is_held_to_min_score_not_the_cascade_scale():
    limits = DetectSettings(min_score=0.98, cascade_min_score=3.0, min_face_px=10)
    faces = [FaceDetection((0, 0, 50, 50), 0.99), FaceDetection((60, 0, 110, 50), 0.97)]
    kept, dropped = select_faces(faces, 200, 200, limits, "retinaface")
    assert [f.score for f in kept] == [0.99] and dropped == {"low_score": 1}
    kept, dropped = select_faces(faces, 200, 200, limits, "cascade")
    assert kept == [] and dropped == {"low_score": 2}


def test_auto_backend_is_retinaface_until_an_insightface_model_is_there(tmp_path):
    settings = Settings(home=tmp_path, models_dir=tmp_path / "models")
    assert settings.detect.backend == "auto"
    detector = load_detector(settings)
    assert detector.backend == "retinaface" and detector.input_size == 1024
    assert detector_identity(settings) == f"retinaface.onnx@sha256:{MODEL_SHA256}"
    pack = tmp_path / "models" / "insightface" / "buffalo_l"
    pack.mkdir(parents=True)
    (pack / "det_10g.onnx").write_bytes(b"a pack's detector")
    assert detector_identity(settings).startswith("det_10g.onnx@sha256:")


def test_detect_stage_keeps_the_large_photos_faces_with_five_point_alignment(
    tmp_path, settings, sample
):
    """The sample's camera-sized photo (stored turned, EXIF orientation 6) and the packaged
    photos through fetch and detect with the default detector and the paper's filters."""
    settings = settings.model_copy(update={"detect": DetectSettings()})
    rows = [row for row in sample if row.path and row.path.startswith(("photos/", "generated/"))]
    routes = {row.path: row.route for row in rows}
    with SampleSite(routes) as site:
        pipeline, shard_id = _fetch_and_detect(settings, routes_source(tmp_path, site, [*routes]))
    with pipeline:
        state = pipeline.state.get_stage(shard_id, "detect")
        faces = pq.read_table(state.artifacts["faces.parquet"]["uri"]).to_pylist()
    keys = {row.path: f"{index:09d}" for index, row in enumerate(rows)}
    large = [f for f in faces if f["key"] == keys["generated/rotated_progressive.jpg"]]
    expected = 6 if "t1.jpg" in packaged_photos() else 1
    assert len(large) == expected
    assert {f["align_method"] for f in faces} == {FIVE_POINT}
    assert all(len(f["landmarks"]) == 10 for f in faces)
    assert all(min(f["x2"] - f["x1"], f["y2"] - f["y1"]) >= 128 for f in faces)
    assert all(f["detector_id"] == f"retinaface.onnx@sha256:{MODEL_SHA256}" for f in faces)
    # stored turned a quarter left: upright faces are taller than wide, stored ones wider
    assert all(f["image_height"] > f["image_width"] for f in large)
    assert all(f["x2"] - f["x1"] > f["y2"] - f["y1"] for f in large)
    assert state.counts["dropped_too_small"] >= 1  # the packaged photos' own small faces
