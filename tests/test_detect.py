"""The detect stage: decoding, filters, known-answer boxes through a real ONNX model, the
cascade on real photos, and the state it leaves."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scrfd_model import build_scrfd_onnx
from support.sampledata import encode, package_file
from support.samplesite import Route, SampleSite
from test_fetch import routes_source

from facecaption.core.imaging import ImageDecodeError, decode_upright, upright_to_raw
from facecaption.core.pipeline import Pipeline
from facecaption.core.stage import StageInputError
from facecaption.core.writers import read_webdataset
from facecaption.detect.backends.base import FaceDetection
from facecaption.detect.stage import select_faces
from facecaption.settings import DetectSettings

EXIF_ORIENTATION = 0x0112
# A face in detector-input pixels (640 x 640), as the fake SCRFD model reports it.
DET_FACE = {
    "box": (160.0, 96.0, 320.0, 288.0),
    "kps": [(200.0, 160.0), (280.0, 160.0), (240.0, 200.0), (210.0, 240.0), (270.0, 240.0)],
    "score": 0.99,
}


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_points_map_back_to_the_stored_pixels(orientation):
    stored = np.zeros((30, 40, 3), np.uint8)
    stored[5, 9] = 255
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "PNG", exif=exif.tobytes())
    upright = decode_upright(buffer.getvalue(), max_pixels=10**6)
    ys, xs = np.nonzero(upright.pixels[:, :, 0])
    point = np.array([[xs[0] + 0.5, ys[0] + 0.5]])
    assert upright.orientation == orientation
    np.testing.assert_allclose(upright_to_raw(point, orientation, upright.raw_size), [[9.5, 5.5]])


def test_decoding_turns_awkward_images_into_rgb8():
    gradient = np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)
    sixteen = decode_upright(encode(Image.fromarray(gradient), "PNG"), 10**6)
    assert sixteen.pixels.dtype == np.uint8 and sixteen.pixels.shape == (48, 64, 3)
    assert sixteen.pixels.max() == 255 and sixteen.pixels.min() == 0
    cmyk = decode_upright(encode(Image.new("CMYK", (10, 8), (0, 255, 255, 0)), "JPEG"), 10**6)
    assert cmyk.pixels.shape == (8, 10, 3) and cmyk.pixels[4, 5, 0] > 200
    tiny = decode_upright(encode(Image.new("RGB", (1, 1)), "PNG"), 10**6)
    assert tiny.pixels.shape == (1, 1, 3)


def test_decoding_refuses_truncated_images_and_pixel_bombs_without_decoding_them():
    jpeg = encode(Image.new("RGB", (400, 300), "white"), "JPEG")
    with pytest.raises(ImageDecodeError):
        decode_upright(jpeg[: len(jpeg) // 2], 10**6)
    bomb = encode(Image.new("1", (30_000, 30_000)), "PNG")
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="pixels"):
        decode_upright(bomb, 89_478_485)
    assert time.perf_counter() - started < 1.0, "the bomb was decoded"


def test_select_faces_counts_why_each_face_was_dropped():
    limits = DetectSettings(min_score=0.98, min_face_px=128, max_faces_per_image=1)
    faces = [
        FaceDetection((0, 0, 200, 200), 0.999),  # kept
        FaceDetection((300, 0, 500, 200), 0.995),  # over the cap of 1
        FaceDetection((0, 300, 200, 500), 0.90),  # low score
        FaceDetection((300, 300, 400, 400), 0.99),  # 100 px: too small
        FaceDetection((560, 300, 760, 500), 0.99),  # mostly outside a 640 px wide image
    ]
    kept, dropped = select_faces(faces, 640, 640, limits, "insightface")
    assert [f.box for f in kept] == [(0, 0, 200, 200)]
    assert dropped == {"over_cap": 1, "low_score": 1, "too_small": 1, "out_of_image": 1}


def _fetch_and_detect(settings, source: Path) -> tuple[Pipeline, str]:
    pipeline = Pipeline.open(settings)
    [shard_id] = pipeline.select_shards([str(source)])
    pipeline.run("fetch", shard_id)
    pipeline.run("detect", shard_id)
    return pipeline, shard_id


def test_detect_maps_model_boxes_back_to_stored_pixels(tmp_path, settings):
    """A real onnxruntime + insightface SCRFD run on a model whose answer is known: the box
    comes back through the letterbox scale and the EXIF rotation to the stored pixels."""
    model = build_scrfd_onnx(tmp_path / "scrfd.onnx", [DET_FACE])
    settings = settings.model_copy(update={"detect": DetectSettings(model_path=str(model))})
    photo = Image.new("RGB", (1280, 960), (120, 100, 90))
    routes = {
        "plain.jpg": Route(with_orientation(photo, 1), "image/jpeg"),
        # stored 960 x 1280 and shown rotated: upright it is 1280 x 960 like the first
        "rotated.jpg": Route(with_orientation(photo.rotate(90, expand=True), 6), "image/jpeg"),
    }
    with SampleSite(routes) as site:
        pipeline, shard_id = _fetch_and_detect(settings, routes_source(tmp_path, site, [*routes]))
    with pipeline:
        state = pipeline.state.get_stage(shard_id, "detect")
        faces = pq.read_table(state.artifacts["faces.parquet"]["uri"]).to_pylist()
        with open(state.artifacts["faces.tar"]["uri"], "rb") as handle:
            crops = read_webdataset(handle)
    assert state.status == "done" and state.counts["faces_kept"] == 2
    scale = 1280 / 640  # letterbox: the long side fills the detector input
    x1, y1, x2, y2 = (v * scale for v in DET_FACE["box"])
    plain, rotated = sorted(faces, key=lambda face: face["key"])
    box = [plain[c] for c in ("x1", "y1", "x2", "y2")]
    np.testing.assert_allclose(box, [x1, y1, x2, y2], atol=1)  # integer pixels, outward
    # orientation 6: upright (x, y) was stored at (y, 1280 - x) in a 960 x 1280 grid
    assert (rotated["image_width"], rotated["image_height"]) == (960, 1280)
    rotated_box = [rotated[c] for c in ("x1", "y1", "x2", "y2")]
    np.testing.assert_allclose(rotated_box, [y1, 1280 - x2, y2, 1280 - x1], atol=1)
    eyes = np.array(plain["landmarks"]).reshape(5, 2)
    np.testing.assert_allclose(eyes, np.array(DET_FACE["kps"]) * scale, atol=0.01)
    assert plain["align_method"] == "five_point" and pytest.approx(plain["score"]) == 0.99
    assert plain["detector_id"].startswith("scrfd.onnx@sha256:")
    # native resolution: the crop is as many pixels across as the face had in the source,
    # i.e. the template's 112 px scaled by source eye distance / template eye distance
    eye_distance = (DET_FACE["kps"][1][0] - DET_FACE["kps"][0][0]) * scale
    native_side = 112 * eye_distance / (73.5318 - 38.2946)
    for face in faces:
        crop = crops[f"{face['key']}_00"]
        with Image.open(io.BytesIO(crop["png"])) as image:
            assert image.size == (face["crop_width"], face["crop_height"])
            assert abs(image.size[0] - native_side) < 0.15 * native_side


def test_detect_keeps_only_faces_that_pass_the_paper_filters(tmp_path, settings):
    small = {**DET_FACE, "box": (100.0, 100.0, 140.0, 150.0)}  # 80 x 100 px after x2
    doubtful = {**DET_FACE, "box": (400.0, 300.0, 560.0, 480.0), "score": 0.9}
    model = build_scrfd_onnx(tmp_path / "scrfd.onnx", [DET_FACE, small, doubtful])
    settings = settings.model_copy(update={"detect": DetectSettings(model_path=str(model))})
    photo = encode(Image.new("RGB", (1280, 1280), (90, 90, 90)), "PNG")
    with SampleSite({"a.png": Route(photo, "image/png")}) as site:
        pipeline, shard_id = _fetch_and_detect(settings, routes_source(tmp_path, site, ["a.png"]))
    with pipeline:
        counts = pipeline.state.get_stage(shard_id, "detect").counts
    assert counts["faces_detected"] == 3 and counts["faces_kept"] == 1
    assert counts["dropped_too_small"] == 1 and counts["dropped_low_score"] == 1


def test_cascade_detect_finds_faces_in_real_photos(tmp_path, settings):
    settings = settings.model_copy(
        update={"detect": DetectSettings(backend="cascade", min_face_px=48)}
    )
    photos = {
        "t1.jpg": package_file("insightface", "data/images/t1.jpg"),
        "astronaut.png": package_file("skimage", "data/astronaut.png"),
    }
    routes = {name: Route(path.read_bytes(), "image/jpeg") for name, path in photos.items()}
    noise = np.random.default_rng(3).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    routes["noise.png"] = Route(encode(Image.fromarray(noise), "PNG"), "image/png")
    with SampleSite(routes) as site:
        pipeline, shard_id = _fetch_and_detect(settings, routes_source(tmp_path, site, [*routes]))
    with pipeline:
        state = pipeline.state.get_stage(shard_id, "detect")
        faces = pq.read_table(state.artifacts["faces.parquet"]["uri"]).to_pylist()
    keys = {name: f"{index:09d}" for index, name in enumerate(routes)}
    per_image = {name: [f for f in faces if f["key"] == key] for name, key in keys.items()}
    assert len(per_image["t1.jpg"]) >= 4
    assert per_image["noise.png"] == []
    [astronaut] = per_image["astronaut.png"]
    assert astronaut["x1"] < 215 < astronaut["x2"] and astronaut["y1"] < 105 < astronaut["y2"]
    assert all(f["detector_id"].startswith("opencv-haarcascade") for f in faces)


def test_detect_waits_for_fetch(tmp_path, settings):
    with SampleSite({}) as site, Pipeline.open(settings) as pipeline:
        [shard_id] = pipeline.select_shards([str(routes_source(tmp_path, site, ["x.png"]))])
        with pytest.raises(StageInputError, match="not done"):
            pipeline.run("detect", shard_id)
        assert pipeline.state.get_stage(shard_id, "detect").status == "pending"
