"""BRISQUE quality: orders a real photo against degraded copies, takes every input form, agrees
with the reference package's score, and reads the packaged model without importing it."""

from __future__ import annotations

import importlib.util
import io
import math
import pickle
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image, ImageFilter
from support.sampledata import package_file

from facecaption.release import quality
from facecaption.release.quality import (
    FEATURE_COUNT,
    MIN_SIDE,
    BrisqueModelError,
    ImageTooSmallError,
    brisque_features,
    brisque_model,
    brisque_score,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("brisque") is None, reason="BRISQUE model: pip install brisque"
)

# brisque 0.2.0's own BRISQUE().score(skimage.data.astronaut()), computed once with the package.
ASTRONAUT_REFERENCE_SCORE = 10.794862939
ASTRONAUT_FACE_CROP = (slice(25, 185), slice(135, 295))  # 160 x 160 around her face


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    path = package_file("skimage", "data/astronaut.png")
    if path is None:
        pytest.skip("scikit-image's sample photos are not installed")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_sharp_photo_scores_better_than_blurred_and_noisy_copies(astronaut: np.ndarray) -> None:
    blurred = np.asarray(Image.fromarray(astronaut).filter(ImageFilter.GaussianBlur(radius=3)))
    noise = np.random.default_rng(0).normal(0, 50, astronaut.shape)
    noisy = np.clip(astronaut + noise, 0, 255).astype(np.uint8)

    sharp_score, blurred_score, noisy_score = map(brisque_score, (astronaut, blurred, noisy))

    assert all(math.isfinite(s) for s in (sharp_score, blurred_score, noisy_score))
    assert sharp_score < blurred_score
    assert sharp_score < noisy_score


def test_agrees_with_the_reference_package(astronaut: np.ndarray) -> None:
    assert brisque_score(astronaut) == pytest.approx(ASTRONAUT_REFERENCE_SCORE, abs=1e-6)


def test_rgba_gray_and_pil_inputs(astronaut: np.ndarray) -> None:
    rgb_score = brisque_score(astronaut)
    half_transparent = np.full(astronaut.shape[:2] + (1,), 128, dtype=np.uint8)
    rgba = np.concatenate([astronaut, half_transparent], axis=2)
    assert brisque_score(rgba) == rgb_score  # alpha is dropped, as the reference drops it
    assert brisque_score(Image.fromarray(rgba, "RGBA")) == rgb_score
    assert brisque_score(Image.fromarray(astronaut)) == rgb_score

    gray = np.asarray(Image.fromarray(astronaut).convert("L"))
    gray_score = brisque_score(gray)
    assert math.isfinite(gray_score)
    assert brisque_score(Image.fromarray(gray, "L")) == gray_score
    assert brisque_score(gray[:, :, None]) == gray_score
    # Three equal channels are the same gray levels, up to rounding of rgb2gray's weights.
    assert brisque_score(np.repeat(gray[:, :, None], 3, axis=2)) == pytest.approx(
        gray_score, abs=1e-6
    )


def test_face_sized_crops_score_finite(astronaut: np.ndarray) -> None:
    crop = astronaut[ASTRONAUT_FACE_CROP]
    assert crop.shape == (160, 160, 3)
    assert math.isfinite(brisque_score(crop))
    assert math.isfinite(brisque_score(astronaut[20:183, 150:311]))  # odd sides halve too
    assert brisque_features(crop).shape == (FEATURE_COUNT,)


def test_tiny_images_raise_and_flat_images_score_nan(astronaut: np.ndarray) -> None:
    with pytest.raises(ImageTooSmallError, match=f">= {MIN_SIDE} px"):
        brisque_score(astronaut[: MIN_SIDE - 1, :100])
    assert math.isfinite(brisque_score(astronaut[200 : 200 + MIN_SIDE, 200 : 200 + MIN_SIDE]))
    assert math.isnan(brisque_score(np.full((64, 64, 3), 128, dtype=np.uint8)))


def test_rejects_arrays_that_are_not_uint8_images(astronaut: np.ndarray) -> None:
    with pytest.raises(TypeError, match="uint8"):
        brisque_score(astronaut.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="shape"):
        brisque_score(np.zeros((32, 32, 5), dtype=np.uint8))


def test_model_is_read_once_without_importing_the_package(astronaut: np.ndarray) -> None:
    brisque_score(astronaut[:64, :64])
    model = brisque_model()
    assert brisque_model() is model
    assert model.support_vectors.shape[1] == FEATURE_COUNT
    assert model.coefficients.shape == model.support_vectors.shape[:1]
    assert "brisque" not in sys.modules


@pytest.fixture
def fresh_model_cache() -> Iterator[None]:
    brisque_model.cache_clear()
    yield
    brisque_model.cache_clear()


@pytest.mark.usefixtures("fresh_model_cache")
def test_missing_package_is_a_typed_error_naming_the_install(
    monkeypatch: pytest.MonkeyPatch, astronaut: np.ndarray
) -> None:
    monkeypatch.setattr(quality, "_MODEL_PACKAGE", "facecaption_no_such_brisque_package")
    with pytest.raises(BrisqueModelError, match="pip install brisque"):
        brisque_score(astronaut)


def test_normalize_pickle_with_code_references_is_refused() -> None:
    svm_path, _ = quality._model_files()
    svm_text = svm_path.read_text(encoding="ascii")
    plain = pickle.dumps({"min_": [0.0] * FEATURE_COUNT, "max_": [1.0] * FEATURE_COUNT})
    assert quality._parse_model(svm_text, plain, svm_path).feature_max.shape == (FEATURE_COUNT,)

    buffer = io.BytesIO()
    pickle.dump({"min_": np.zeros(FEATURE_COUNT), "max_": np.ones(FEATURE_COUNT)}, buffer)
    with pytest.raises(BrisqueModelError, match="only plain data"):
        quality._parse_model(svm_text, buffer.getvalue(), svm_path)
