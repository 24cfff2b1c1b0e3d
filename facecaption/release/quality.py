"""BRISQUE no-reference image quality (Mittal, Moorthy and Bovik, 2012), computed offline.

BRISQUE describes an image by 36 natural-scene statistics and maps them to a quality score
with a support vector regressor trained on human opinion scores: lower is better, about 0 to
100 for ordinary photos (it can leave that range). The regressor is the one the `brisque`
package (0.2.0) ships, in its `models/svm.txt` (a libsvm text model) and
`models/normalize.pickle` (per-feature min and max for scaling to [-1, 1]). Only those two
files are read: the package is located with `importlib.util.find_spec`, which does not run
its `__init__` (that pulls in OpenCV, libsvm, requests and old scipy modules), the libsvm
model is parsed here and the RBF regressor evaluated with numpy, and the pickle is read by an
unpickler that accepts plain data only. Nothing is downloaded.

The features are computed as `brisque.BRISQUE.score` computes them, so that scores agree
with it (to about 1e-10): gray levels in [0, 1] as scikit-image's `rgb2gray` gives them (alpha
dropped); MSCN coefficients from a 7x7 Gaussian window (sigma 7/6) by scipy's `convolve2d`,
zero outside the image, with C = 1/255; an asymmetric generalised Gaussian fit (alpha, mean,
left and right variance; the reference fits the MSCN coefficients themselves this way too) of
the MSCN coefficients and of their horizontal, vertical and two diagonal neighbour products;
all of it again on the image halved by OpenCV's bicubic `resize`, reproduced here in numpy.

Images need both sides of at least `MIN_SIDE` pixels (else `ImageTooSmallError`). Images whose
statistics cannot be fitted (a flat image has no negative MSCN coefficients) score NaN.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from facecaption.core.imaging import to_rgb8

MIN_SIDE = 16  # pixels, both sides; the half-scale image is then at least 8 x 8
FEATURE_COUNT = 36

_MODEL_PACKAGE = "brisque"
_MODEL_FILES = ("models/svm.txt", "models/normalize.pickle")
_RGB_TO_GRAY = np.array([0.2125, 0.7154, 0.0721])  # scikit-image's rgb2gray (BT.709)
_WINDOW = 7
_WINDOW_SIGMA = 7 / 6
_MSCN_C = 1 / 255
# OpenCV's INTER_CUBIC (a = -0.75) taps for a sample halfway between two pixels: halving puts
# output pixel i at input position 2i + 0.5.
_HALVING_TAPS = (-0.09375, 0.59375, 0.59375, -0.09375)
# Bounds of the shape-parameter search; phi(alpha) rises from 0 towards 3/4 over them.
_ALPHA_BOUNDS = (1e-3, 1e3)


class BrisqueModelError(ImportError):
    """The BRISQUE model files (from the `brisque` package) are missing or unreadable."""


class ImageTooSmallError(ValueError):
    """An image with a side shorter than MIN_SIDE pixels: too small for BRISQUE statistics."""


@dataclass(frozen=True)
class BrisqueModel:
    support_vectors: np.ndarray  # (n, 36) float64, in scaled feature space
    coefficients: np.ndarray  # (n,) float64, dual coefficients
    gamma: float  # RBF kernel: exp(-gamma * ||sv - x||^2)
    rho: float  # score = sum(coef * kernel) - rho
    feature_min: np.ndarray  # (36,) float64, scaled to -1
    feature_max: np.ndarray  # (36,) float64, scaled to +1

    def predict(self, features: np.ndarray) -> float:
        """The regressor's score for raw (unscaled) features."""
        span = self.feature_max - self.feature_min
        scaled = -1 + (2.0 / span) * (features - self.feature_min)
        squared_distances = np.sum((self.support_vectors - scaled) ** 2, axis=1)
        kernel = np.exp(-self.gamma * squared_distances)
        return float(self.coefficients @ kernel - self.rho)


def brisque_score(image: Image.Image | np.ndarray) -> float:
    """BRISQUE quality score of an image; lower is better.

    `image` is a PIL image of any mode, or a uint8 array: H x W gray, H x W x 1, H x W x 2
    (gray and alpha), H x W x 3 RGB or H x W x 4 RGBA. Alpha is dropped, not composited.
    Raises ImageTooSmallError for a side under MIN_SIDE pixels, BrisqueModelError without the
    `brisque` package; returns NaN for an image whose statistics cannot be fitted.
    """
    model = brisque_model()  # first, so that a missing package is the error reported
    features = brisque_features(image)
    if not np.all(np.isfinite(features)):
        return math.nan
    return model.predict(features)


def brisque_features(image: Image.Image | np.ndarray) -> np.ndarray:
    """The 36 raw BRISQUE features: 18 at full size, then 18 at half size. NaN where a fit
    fails."""
    gray = _gray(image)
    if min(gray.shape) < MIN_SIDE:
        raise ImageTooSmallError(
            f"{gray.shape[1]}x{gray.shape[0]} image: BRISQUE needs both sides >= {MIN_SIDE} px"
        )
    return np.concatenate([_scale_features(gray), _scale_features(_halve(gray))])


@functools.cache
def brisque_model() -> BrisqueModel:
    """The trained model shipped by the `brisque` package, read once per process."""
    svm_path, normalize_path = _model_files()
    try:
        svm_text = svm_path.read_text(encoding="ascii")
        normalize_bytes = normalize_path.read_bytes()
    except (OSError, UnicodeDecodeError) as error:
        raise BrisqueModelError(f"cannot read the BRISQUE model files: {error}") from error
    return _parse_model(svm_text, normalize_bytes, svm_path)


def _model_files() -> tuple[Path, Path]:
    try:
        spec = importlib.util.find_spec(_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise BrisqueModelError(
            "BRISQUE needs the model files of the `brisque` package: pip install brisque "
            "(only its models/svm.txt and models/normalize.pickle are read)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    paths = tuple(root / relative for relative in _MODEL_FILES)
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise BrisqueModelError(
            f"the `brisque` package at {root} lacks {', '.join(missing)}: "
            "pip install --force-reinstall brisque"
        )
    return paths[0], paths[1]


class _PlainDataUnpickler(pickle.Unpickler):
    """Reads dicts, lists and numbers; refuses any class or function reference."""

    def find_class(self, module: str, name: str) -> type:
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only plain data is expected")


def _parse_model(svm_text: str, normalize_bytes: bytes, source: Path) -> BrisqueModel:
    try:
        header, _, body = svm_text.partition("\nSV\n")
        fields = dict(line.split(maxsplit=1) for line in header.splitlines() if line.strip())
        if fields.get("svm_type") != "epsilon_svr" or fields.get("kernel_type") != "rbf":
            raise ValueError(f"expected an epsilon_svr model with an rbf kernel, got {fields}")
        gamma, rho = float(fields["gamma"]), float(fields["rho"])
        rows = [line.split() for line in body.splitlines() if line.strip()]
        coefficients = np.array([float(row[0]) for row in rows])
        support_vectors = np.zeros((len(rows), FEATURE_COUNT))
        for i, row in enumerate(rows):
            for pair in row[1:]:
                index, value = pair.split(":")
                if not 1 <= int(index) <= FEATURE_COUNT:  # libsvm indices start at 1
                    raise ValueError(f"feature index {index} outside 1..{FEATURE_COUNT}")
                support_vectors[i, int(index) - 1] = float(value)
        if len(rows) != int(fields["total_sv"]):
            raise ValueError(f"{len(rows)} support vectors, header says {fields['total_sv']}")
        scale = _PlainDataUnpickler(io.BytesIO(normalize_bytes)).load()
        feature_min = np.asarray(scale["min_"], dtype=np.float64)
        feature_max = np.asarray(scale["max_"], dtype=np.float64)
        if feature_min.shape != (FEATURE_COUNT,) or feature_max.shape != (FEATURE_COUNT,):
            raise ValueError(f"scaling for {feature_min.shape} features, not {FEATURE_COUNT}")
    except (ValueError, KeyError, IndexError, TypeError, pickle.UnpicklingError) as error:
        raise BrisqueModelError(f"unreadable BRISQUE model at {source.parent}: {error}") from error
    return BrisqueModel(support_vectors, coefficients, gamma, rho, feature_min, feature_max)


def _gray(image: Image.Image | np.ndarray) -> np.ndarray:
    """Gray levels in [0, 1] as float64, as scikit-image's rgb2gray gives them."""
    if isinstance(image, Image.Image):
        pixels = np.asarray(image) if image.mode == "L" else to_rgb8(image)
    else:
        pixels = np.asarray(image)
        if pixels.dtype != np.uint8:
            raise TypeError(f"expected a uint8 image array, got {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] in (1, 2):  # gray, or gray and alpha
        pixels = pixels[:, :, 0]
    elif pixels.ndim == 3 and pixels.shape[2] in (3, 4):  # RGB, or RGBA
        return (pixels[:, :, :3] * (1.0 / 255)) @ _RGB_TO_GRAY  # as img_as_float, rgb2gray
    if pixels.ndim != 2:
        raise ValueError(f"expected H x W or H x W x 1..4 pixels, got shape {pixels.shape}")
    return pixels * (1.0 / 255)


def _scale_features(gray: np.ndarray) -> np.ndarray:
    """18 features of one scale: the MSCN fit's alpha and variance, then alpha, mean, left
    and right variance of the horizontal, vertical, main and secondary diagonal products."""
    mscn = _mscn(gray)
    alpha, _, left, right = _aggd_fit(mscn)
    features = [alpha, (left + right) / 2]
    for product in (
        mscn[:, :-1] * mscn[:, 1:],
        mscn[:-1, :] * mscn[1:, :],
        mscn[:-1, :-1] * mscn[1:, 1:],
        mscn[1:, :-1] * mscn[:-1, 1:],
    ):
        features.extend(_aggd_fit(product))
    return np.array(features, dtype=np.float64)


def _gaussian_window() -> np.ndarray:
    """The normalised 7x7 Gaussian window, built exactly as the reference builds it."""
    y, x = np.indices((_WINDOW, _WINDOW)) - _WINDOW // 2
    window = 1 / (2 * np.pi * _WINDOW_SIGMA**2) * np.exp(-(x**2 + y**2) / (2 * _WINDOW_SIGMA**2))
    return window / np.sum(window)


_GAUSSIAN_WINDOW = _gaussian_window()


def _local_mean(image: np.ndarray) -> np.ndarray:
    """Gaussian-weighted local mean, zero outside the image. This is scipy's convolve2d, as in
    the reference, not a faster separable filter: in flat regions the MSCN coefficients are
    rounding noise whose signs move them between the left and right halves of the fits, so
    only the same arithmetic gives the same scores."""
    from scipy.signal import convolve2d  # scipy comes with scikit-image, a brisque dependency

    return convolve2d(image, _GAUSSIAN_WINDOW, "same")


def _mscn(gray: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients."""
    mean = _local_mean(gray)
    deviation = np.sqrt(np.abs(mean**2 - _local_mean(gray**2)))
    return (gray - mean) / (deviation + _MSCN_C)


def _halve(image: np.ndarray) -> np.ndarray:
    """cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC) for float64:
    sizes rounded half to even, borders replicated, rows resampled first."""
    return _halve_axis(_halve_axis(image, axis=1), axis=0)


def _halve_axis(image: np.ndarray, axis: int) -> np.ndarray:
    size = image.shape[axis]
    centres = 2 * np.arange(round(size / 2))  # Python's round() is half to even, as cvRound
    taps = [
        np.take(image, np.clip(centres + offset, 0, size - 1), axis=axis)
        for offset in (-1, 0, 1, 2)
    ]
    return sum(weight * tap for weight, tap in zip(_HALVING_TAPS, taps, strict=True))


def _aggd_fit(values: np.ndarray) -> tuple[float, float, float, float]:
    """Asymmetric generalised Gaussian fit by moment matching: (alpha, mean, left variance,
    right variance), NaN where one side is empty."""
    values = values.ravel()
    left, right = values[values < 0], values[values >= 0]
    if left.size == 0 or right.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    left_variance = float(np.mean(left**2))
    right_variance = float(np.mean(right**2))
    mean_square = float(np.mean(values**2))
    if right_variance == 0 or mean_square == 0:
        return math.nan, math.nan, left_variance, right_variance
    gamma = math.sqrt(left_variance) / math.sqrt(right_variance)
    r_hat = float(np.mean(np.abs(values))) ** 2 / mean_square
    big_r_hat = r_hat * (gamma**3 + 1) * (gamma + 1) / (gamma**2 + 1) ** 2
    alpha = _solve_alpha(big_r_hat)
    ratio = math.exp(math.lgamma(1 / alpha) - math.lgamma(3 / alpha))
    mean = (
        (math.sqrt(right_variance) - math.sqrt(left_variance))
        * math.sqrt(ratio)
        * math.exp(math.lgamma(2 / alpha) - math.lgamma(1 / alpha))
    )
    return alpha, mean, left_variance, right_variance


def _phi(alpha: float) -> float:
    """Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)), increasing from 0 to 3/4."""
    return math.exp(2 * math.lgamma(2 / alpha) - math.lgamma(1 / alpha) - math.lgamma(3 / alpha))


def _solve_alpha(target: float) -> float:
    """The shape alpha with phi(alpha) = target, by bisection on log(alpha); clamped to
    _ALPHA_BOUNDS when the target is out of phi's range."""
    low, high = (math.log(bound) for bound in _ALPHA_BOUNDS)
    if target <= _phi(_ALPHA_BOUNDS[0]):
        return _ALPHA_BOUNDS[0]
    if target >= _phi(_ALPHA_BOUNDS[1]):
        return _ALPHA_BOUNDS[1]
    for _ in range(100):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if _phi(math.exp(middle)) < target:
            low = middle
        else:
            high = middle
    return math.exp((low + high) / 2)
