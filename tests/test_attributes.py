"""Attributes: the label-set rules, the classifier sidecar and its preprocessing, the ONNX
classifier through a real onnxruntime session with known answers, and the attribute stage on
real aligned crops from the detect stage."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scrfd_model import build_scrfd_onnx
from support.sampledata import encode
from support.samplesite import Route, SampleSite
from support.statistics_model import INPUT_SIZE, expected_logits
from test_detect import DET_FACE, _fetch_and_detect
from test_fetch import routes_source

from facecaption.attribute.backends.onnx import (
    AttributeModelSpec,
    OnnxAttributeModel,
    preprocess,
)
from facecaption.attribute.labels import (
    CATEGORIES,
    CATEGORY_OF,
    CELEBA_ATTRIBUTES,
    HAIR_COLOURS,
    label_set,
)
from facecaption.core.pipeline import Pipeline
from facecaption.core.stage import StageInputError
from facecaption.core.writers import read_webdataset
from facecaption.models.errors import ModelNotFoundError
from facecaption.models.locate import attribute_model
from facecaption.settings import DetectSettings

THRESHOLD = 0.85
# Five labels no rule touches: enough for a face to be kept at the paper's min_labels.
NEUTRAL = ("Male", "Young", "Smiling", "Eyeglasses", "Big_Nose")


def probs(**high: float) -> dict[str, float]:
    values = dict.fromkeys(CELEBA_ATTRIBUTES, 0.1)
    assert set(high) <= set(values)
    values.update(high)
    return values


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


# --- label_set ---------------------------------------------------------------------------


def test_threshold_is_strict():
    at = label_set(probs(Male=0.85), THRESHOLD, 0)
    above = label_set(probs(Male=0.8501), THRESHOLD, 0)
    assert at.valid == () and above.valid == ("Male",)


def test_min_labels_keeps_faces_with_enough_labels():
    four = label_set(probs(**dict.fromkeys(NEUTRAL[:4], 0.9)), THRESHOLD, 5)
    five = label_set(probs(**dict.fromkeys(NEUTRAL, 0.9)), THRESHOLD, 5)
    assert len(four.valid) == 4 and not four.kept
    assert len(five.valid) == 5 and five.kept
    # valid labels come back in CelebA order whatever the dict order
    assert five.valid == tuple(n for n in CELEBA_ATTRIBUTES if n in NEUTRAL)


def test_several_hair_colours_keep_the_most_probable():
    labels = label_set(
        probs(Black_Hair=0.9, Blond_Hair=0.97, Brown_Hair=0.95, Gray_Hair=0.2), THRESHOLD, 0
    )
    assert labels.valid == ("Blond_Hair",)
    assert labels.dropped == ("Black_Hair<Blond_Hair", "Brown_Hair<Blond_Hair")
    single = label_set(probs(Gray_Hair=0.9), THRESHOLD, 0)
    assert single.valid == ("Gray_Hair",) and single.dropped == ()


@pytest.mark.parametrize(
    ("straight", "wavy", "winner", "loser"),
    [(0.95, 0.9, "Straight_Hair", "Wavy_Hair"), (0.9, 0.95, "Wavy_Hair", "Straight_Hair")],
)
def test_straight_and_wavy_keep_the_more_probable(straight, wavy, winner, loser):
    labels = label_set(probs(Straight_Hair=straight, Wavy_Hair=wavy), THRESHOLD, 0)
    assert labels.valid == (winner,)
    assert labels.dropped == (f"{loser}<{winner}",)


def test_bald_beats_all_hair_labels_when_more_probable():
    labels = label_set(
        probs(Bald=0.99, Bangs=0.9, Wavy_Hair=0.92, Gray_Hair=0.95, Male=0.9), THRESHOLD, 0
    )
    assert labels.valid == ("Bald", "Male")
    assert labels.dropped == ("Bangs<Bald", "Gray_Hair<Bald", "Wavy_Hair<Bald")


def test_a_hair_label_more_probable_than_bald_drops_bald():
    labels = label_set(probs(Bald=0.9, Bangs=0.88, Brown_Hair=0.95), THRESHOLD, 0)
    assert labels.valid == ("Bangs", "Brown_Hair")
    assert labels.dropped == ("Bald<Brown_Hair",)


def test_hair_rules_apply_in_order_before_bald():
    # colours first (Black beats Blond), then Bald against the remaining hair labels
    labels = label_set(probs(Bald=0.93, Black_Hair=0.96, Blond_Hair=0.9), THRESHOLD, 0)
    assert labels.valid == ("Black_Hair",)
    assert labels.dropped == ("Blond_Hair<Black_Hair", "Bald<Black_Hair")


def test_no_beard_beats_facial_hair_when_more_probable():
    labels = label_set(probs(No_Beard=0.99, Goatee=0.9, Mustache=0.95), THRESHOLD, 0)
    assert labels.valid == ("No_Beard",)
    assert labels.dropped == ("Goatee<No_Beard", "Mustache<No_Beard")


@pytest.mark.parametrize("rival", ["Goatee", "Mustache"])
def test_facial_hair_more_probable_than_no_beard_drops_it(rival):
    labels = label_set(probs(No_Beard=0.9, **{rival: 0.95}), THRESHOLD, 0)
    assert labels.valid == (rival,)
    assert labels.dropped == (f"No_Beard<{rival}",)
    # below the threshold, a facial-hair label contradicts nothing
    quiet = label_set(probs(No_Beard=0.9, **{rival: 0.8}), THRESHOLD, 0)
    assert quiet.valid == ("No_Beard",) and quiet.dropped == ()


def test_attractive_and_blurry_stay_valid_but_flagged():
    labels = label_set(probs(Attractive=0.9, Blurry=0.95, Male=0.9), THRESHOLD, 3)
    assert labels.valid == ("Attractive", "Blurry", "Male")
    assert labels.flagged == ("Attractive", "Blurry")
    assert labels.kept  # flagged labels still count towards min_labels
    assert label_set(probs(Male=0.9), THRESHOLD, 0).flagged == ()


def test_the_five_categories_partition_the_40_attributes():
    assert len(CELEBA_ATTRIBUTES) == 40 == len(set(CELEBA_ATTRIBUTES))
    assert len(CATEGORIES) == 5
    listed = [name for names in CATEGORIES.values() for name in names]
    assert len(listed) == 40 and set(listed) == set(CELEBA_ATTRIBUTES)
    assert set(CATEGORY_OF) == set(CELEBA_ATTRIBUTES)
    assert all(CATEGORY_OF[name] == "hairstyle" for name in HAIR_COLOURS)


# --- sidecar -----------------------------------------------------------------------------


def spec(**changes) -> AttributeModelSpec:
    base = {
        "name": "test-model",
        "input_size": 32,
        "labels": CELEBA_ATTRIBUTES,
        "crop": "center_square",
        "interpolation": "nearest",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "output": "logits",
    }
    return AttributeModelSpec(**{**base, **changes})


def test_sidecar_round_trips(tmp_path):
    original = spec(labels=tuple(reversed(CELEBA_ATTRIBUTES)), crop="none", output="probabilities")
    path = tmp_path / "model.json"
    original.save(path)
    assert AttributeModelSpec.load(path) == original
    assert json.loads(path.read_text())["labels"][0] == CELEBA_ATTRIBUTES[-1]


def test_sidecar_defaults_apply_when_left_out(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"name": "m", "input_size": 8, "labels": CELEBA_ATTRIBUTES}))
    loaded = AttributeModelSpec.load(path)
    assert (loaded.crop, loaded.interpolation, loaded.output) == (
        "center_square",
        "bicubic",
        "logits",
    )
    assert loaded.mean == loaded.std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": list(CELEBA_ATTRIBUTES[:-1])}, "missing \\['Young'\\]"),
        ({"labels": [*CELEBA_ATTRIBUTES[:-1], "Wearing_Cape"]}, "unknown \\['Wearing_Cape'\\]"),
        ({"labels": [*CELEBA_ATTRIBUTES, "Male"]}, "40 CelebA names once each"),
        ({"interpolation": "hamming"}, "interpolation"),
        ({"std": [0.5, 0.0, 0.5]}, "std"),
        ({"crop": "face"}, "crop"),
        ({"output": "softmax"}, "output"),
    ],
)
def test_bad_sidecars_are_refused_naming_the_file(tmp_path, change, message):
    path = tmp_path / "broken-model.json"
    path.write_text(json.dumps({**spec().as_json(), **change}))
    with pytest.raises(ValueError, match=re.escape(str(path))) as raised:
        AttributeModelSpec.load(path)
    assert re.search(message, str(raised.value))


# --- preprocess --------------------------------------------------------------------------


def pillow_nearest_indices(src: int, dst: int) -> np.ndarray:
    """Pillow's NEAREST source index per output index: it steps a double by src / dst from
    src / (2 dst) and truncates, i.e. floor((dst_index + 0.5) * src / dst) up to rounding."""
    step = src / dst
    positions = np.cumsum(np.concatenate([[step * 0.5], np.full(dst - 1, step)]))
    indices = positions.astype(np.int64)
    closed_form = np.floor((np.arange(dst) + 0.5) * src / dst).astype(np.int64)
    assert np.array_equal(indices, closed_form)  # no rounding edge for the sizes used here
    return indices


def reference_preprocess(image: np.ndarray, s: AttributeModelSpec) -> np.ndarray:
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top : top + side, left : left + side].astype(np.float64)
    index = pillow_nearest_indices(side, s.input_size)
    resized = square[index][:, index]
    scaled = resized / 255.0
    normalised = (scaled - np.array(s.mean)) / np.array(s.std)
    return normalised.transpose(2, 0, 1)


@pytest.mark.parametrize(("height", "width"), [(90, 131), (131, 90), (57, 20), (20, 20)])
@pytest.mark.parametrize("input_size", [32, 64])
def test_preprocess_matches_the_documented_pipeline(height, width, input_size):
    image = np.random.default_rng(height * width).integers(
        0, 256, (height, width, 3), dtype=np.uint8
    )
    s = spec(input_size=input_size)
    got = preprocess(image, s)
    assert got.dtype == np.float32 and got.shape == (3, input_size, input_size)
    assert got.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(got, reference_preprocess(image, s), rtol=0, atol=1e-6)


def test_preprocess_crop_offsets_round_down():
    # a 3-pixel-wide strip: the centre square of a 1 x 4 image starts at column 1
    image = np.zeros((1, 4, 3), np.uint8)
    image[0, 1] = 255
    s = spec(input_size=1, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    np.testing.assert_array_equal(preprocess(image, s), np.ones((3, 1, 1), np.float32))


def test_bicubic_preprocess_and_the_crop_policy():
    image = np.random.default_rng(5).integers(0, 256, (70, 120, 3), dtype=np.uint8)
    image[:, :25] = 255  # the sides differ from the centre, so cropping them matters
    s = spec(interpolation="bicubic", input_size=48, mean=(0.5,) * 3, std=(0.5,) * 3)
    cropped = preprocess(image, s)
    whole = preprocess(image, spec(**{**s.as_json(), "labels": s.labels, "crop": "none"}))
    for out in (cropped, whole):
        assert out.dtype == np.float32 and out.shape == (3, 48, 48)
        assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6
    assert np.abs(cropped - whole).max() > 0.1
    assert whole[:, :, 0].mean() > cropped[:, :, 0].mean()  # the white band is in "none"


# --- OnnxAttributeModel -------------------------------------------------------------------


def faces_of_many_sizes(count: int, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    faces = []
    for _ in range(count):
        height, width = rng.integers(40, 140, 2)
        base = rng.integers(0, 256, 3)
        spread = rng.integers(1, 120)
        noise = rng.integers(-spread, spread + 1, (height, width, 3))
        faces.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return faces


def test_statistics_model_probabilities_are_known(statistics_model):
    model = OnnxAttributeModel(statistics_model, providers=["CPUExecutionProvider"])
    faces = faces_of_many_sizes(9)
    got = model.predict(faces)
    batch = np.stack([preprocess(face, model.spec) for face in faces])
    assert batch.shape == (9, 3, INPUT_SIZE, INPUT_SIZE)
    assert got.shape == (9, 40)
    np.testing.assert_allclose(got, sigmoid(expected_logits(batch)), rtol=0, atol=1e-5)
    assert got.std(axis=0).min() > 0  # faces differ, so every column varies
    digest = hashlib.sha256(statistics_model.read_bytes()).hexdigest()
    sidecar = hashlib.sha256(statistics_model.with_suffix(".json").read_bytes()).hexdigest()
    assert model.model_id == f"statistics.onnx@sha256:{digest}+sidecar:{sidecar[:16]}"
    assert model.predict([]).shape == (0, 40)


def test_sidecar_label_order_is_undone(tmp_path, statistics_model):
    copy = tmp_path / "reversed.onnx"
    shutil.copyfile(statistics_model, copy)
    original_spec = AttributeModelSpec.load(statistics_model.with_suffix(".json"))
    reversed_spec = AttributeModelSpec(
        **{**original_spec.as_json(), "labels": tuple(reversed(CELEBA_ATTRIBUTES))}
    )
    reversed_spec.save(copy.with_suffix(".json"))
    faces = faces_of_many_sizes(5, seed=11)
    cpu = ["CPUExecutionProvider"]
    original = OnnxAttributeModel(statistics_model, providers=cpu).predict(faces)
    permuted = OnnxAttributeModel(copy, providers=cpu).predict(faces)
    # output k of the ONNX is CelebA name k; the sidecar calls it name 39 - k
    np.testing.assert_array_equal(permuted, original[:, ::-1])
    assert not np.allclose(permuted, original)


def test_batch_size_does_not_change_the_answer(statistics_model):
    faces = faces_of_many_sizes(70, seed=3)
    cpu = ["CPUExecutionProvider"]
    one = OnnxAttributeModel(statistics_model, batch_size=1, providers=cpu).predict(faces)
    many = OnnxAttributeModel(statistics_model, batch_size=32, providers=cpu).predict(faces)
    assert one.shape == many.shape == (70, 40)
    np.testing.assert_allclose(one, many, rtol=0, atol=1e-6)
    s = AttributeModelSpec.load(statistics_model.with_suffix(".json"))
    batch = np.stack([preprocess(face, s) for face in faces])
    np.testing.assert_allclose(many, sigmoid(expected_logits(batch)), rtol=0, atol=1e-5)


def test_a_missing_model_says_how_to_get_one(tmp_path, settings):
    with pytest.raises(ModelNotFoundError):
        OnnxAttributeModel(tmp_path / "absent.onnx")
    only_onnx = tmp_path / "lonely.onnx"
    only_onnx.write_bytes(b"not used")
    with pytest.raises(ModelNotFoundError, match="lonely.json"):
        OnnxAttributeModel(only_onnx)
    cached = settings.model_copy(
        update={
            "models_dir": tmp_path / "empty-cache",
            "attribute": settings.attribute.model_copy(update={"model_path": None}),
        }
    )
    with pytest.raises(ModelNotFoundError, match="facecaption models convert-attributes"):
        attribute_model(cached)


# --- the stage ---------------------------------------------------------------------------

SECOND_FACE = {
    "box": (400.0, 96.0, 560.0, 288.0),
    "kps": [(x + 240.0, y) for x, y in DET_FACE["kps"]],
    "score": 0.995,
}


def textured_photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:960, 0:1280]
    base = np.stack([rows * 255 / 960, cols * 255 / 1280, (rows + cols) % 256], axis=-1)
    noise = rng.normal(0, 20 + 15 * seed, base.shape)
    return encode(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)), "PNG")


def expected_from_crops(faces_tar: str, spec_path: Path) -> dict[str, np.ndarray]:
    s = AttributeModelSpec.load(spec_path)
    with open(faces_tar, "rb") as handle:
        samples = read_webdataset(handle)
    expected = {}
    for files in samples.values():
        face_id = json.loads(files["json"])["face_id"]
        with Image.open(io.BytesIO(files["png"])) as crop:
            pixels = np.asarray(crop.convert("RGB"))
        batch = preprocess(pixels, s)[None]
        expected[face_id] = sigmoid(expected_logits(batch))[0]
    return expected


def with_attribute(settings, **changes):
    return settings.model_copy(update={"attribute": settings.attribute.model_copy(update=changes)})


def test_attribute_stage_on_aligned_crops(tmp_path, settings, statistics_model):
    model = build_scrfd_onnx(tmp_path / "scrfd.onnx", [DET_FACE, SECOND_FACE])
    settings = settings.model_copy(update={"detect": DetectSettings(model_path=str(model))})
    routes = {f"p{i}.png": Route(textured_photo(i), "image/png") for i in range(2)}
    with SampleSite(routes) as site:
        pipeline, shard_id = _fetch_and_detect(settings, routes_source(tmp_path, site, [*routes]))
    with pipeline:
        detect = pipeline.state.get_stage(shard_id, "detect")
        outcome = pipeline.run("attribute", shard_id)
        state = pipeline.state.get_stage(shard_id, "attribute")
    assert detect.counts["faces_kept"] == 4
    faces = pq.read_table(detect.artifacts["faces.parquet"]["uri"]).to_pylist()
    table = pq.read_table(state.artifacts["attributes.parquet"]["uri"])
    rows = table.to_pylist()
    assert outcome.status == "done" and state.status == "done"
    assert [r["face_id"] for r in rows] == [f["face_id"] for f in faces]

    p_columns = [c for c in table.column_names if c.startswith("p_")]
    assert p_columns == [f"p_{name}" for name in CELEBA_ATTRIBUTES]
    expected = expected_from_crops(
        detect.artifacts["faces.tar"]["uri"], statistics_model.with_suffix(".json")
    )
    assert set(expected) == {r["face_id"] for r in rows}
    digest = hashlib.sha256(statistics_model.read_bytes()).hexdigest()
    contradictions = kept = 0
    sidecar = hashlib.sha256(statistics_model.with_suffix(".json").read_bytes()).hexdigest()
    for row in rows:
        got = np.array([row[c] for c in p_columns])
        np.testing.assert_allclose(got, expected[row["face_id"]], rtol=0, atol=1e-5)
        labels = label_set(dict(zip(CELEBA_ATTRIBUTES, got, strict=True)), 0.85, 5)
        above = [n for n, p in zip(CELEBA_ATTRIBUTES, got, strict=True) if p > 0.85]
        assert set(row["valid_labels"]) <= set(above)
        assert len(row["valid_labels"]) + len(row["dropped_labels"]) == len(above)
        assert list(row["valid_labels"]) == list(labels.valid)
        assert list(row["dropped_labels"]) == list(labels.dropped)
        assert list(row["flagged_labels"]) == list(labels.flagged)
        assert row["label_count"] == len(row["valid_labels"])
        assert row["kept"] == (len(row["valid_labels"]) >= 5)
        assert row["model_id"] == f"statistics.onnx@sha256:{digest}+sidecar:{sidecar[:16]}"
        contradictions += len(row["dropped_labels"])
        kept += row["kept"]
    # the crops differ, so do their probabilities
    assert len({tuple(round(r[c], 6) for c in p_columns) for r in rows}) == 4
    assert state.counts == {"faces": 4, "kept": kept, "contradictions": contradictions}
    assert contradictions > 0 and kept > 0

    # unchanged inputs: a no-op
    with Pipeline.open(settings) as pipeline:
        again = pipeline.run("attribute", shard_id)
        assert again.status == "skipped"
        assert pipeline.state.get_stage(shard_id, "attribute").attempt == state.attempt

    # min_labels decides `kept` only; every face stays in the file either way
    counts = [r["label_count"] for r in rows]
    seen = set()
    for min_labels in (min(counts), max(counts), max(counts) + 1):
        changed = with_attribute(settings, min_labels=min_labels)
        with Pipeline.open(changed) as pipeline:
            rerun = pipeline.run("attribute", shard_id)
            ref = pipeline.state.get_stage(shard_id, "attribute").artifacts["attributes.parquet"]
        kept_column = pq.read_table(ref["uri"]).column("kept").to_pylist()
        assert rerun.status == "done"
        assert kept_column == [count >= min_labels for count in counts]
        assert rerun.counts["kept"] == sum(kept_column) and rerun.counts["faces"] == 4
        seen.update(kept_column)
    assert seen == {True, False}
    assert rerun.counts["kept"] == 0

    # only the threshold changed since the last run: it re-runs and lets more labels through
    lower = with_attribute(settings, threshold=0.5, min_labels=max(counts) + 1)
    with Pipeline.open(lower) as pipeline:
        rerun = pipeline.run("attribute", shard_id)
        lowered = pq.read_table(
            pipeline.state.get_stage(shard_id, "attribute").artifacts["attributes.parquet"]["uri"]
        ).to_pylist()
        assert pipeline.run("attribute", shard_id).status == "skipped"
    assert rerun.status == "done"
    for before, after in zip(rows, lowered, strict=True):
        p = {n: after[f"p_{n}"] for n in CELEBA_ATTRIBUTES}
        assert all(after[f"p_{n}"] == before[f"p_{n}"] for n in CELEBA_ATTRIBUTES)
        above = sum(v > 0.5 for v in p.values())
        assert above > sum(before[f"p_{n}"] > 0.85 for n in CELEBA_ATTRIBUTES)
        assert after["label_count"] + len(after["dropped_labels"]) == above
        assert list(after["valid_labels"]) == list(label_set(p, 0.5, 0).valid)
    assert sum(len(r["dropped_labels"]) for r in lowered) == rerun.counts["contradictions"]

    # the model gone: the stage says how to get one and leaves the state as it was
    gone = with_attribute(settings, model_path=str(tmp_path / "gone.onnx"))
    with Pipeline.open(gone) as pipeline:
        with pytest.raises(ModelNotFoundError, match="facecaption models convert-attributes"):
            pipeline.run("attribute", shard_id)
        assert pipeline.state.get_stage(shard_id, "attribute").status == "done"


def test_attribute_waits_for_detect(tmp_path, settings):
    routes = {"p0.png": Route(textured_photo(0), "image/png")}
    with SampleSite(routes) as site, Pipeline.open(settings) as pipeline:
        [shard_id] = pipeline.select_shards([str(routes_source(tmp_path, site, [*routes]))])
        with pytest.raises(StageInputError, match="not done"):
            pipeline.run("attribute", shard_id)
        assert pipeline.state.get_stage(shard_id, "attribute").status == "pending"
        pipeline.run("fetch", shard_id)
        with pytest.raises(StageInputError, match="detect .* not done"):
            pipeline.run("attribute", shard_id)
        assert pipeline.state.get_stage(shard_id, "attribute").status == "pending"
