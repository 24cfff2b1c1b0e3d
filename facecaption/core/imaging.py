"""Images with Pillow: whether downloaded bytes are an image we keep (without re-encoding),
and decoding kept images upright for the later stages.

The format comes from the bytes (Pillow's magic-number sniffing), never from a Content-Type
header. Pixel count is checked from the header before any decoding, as a guard against
decompression bombs. The image is then fully decoded once to catch truncated or corrupt
files; JPEGs decode in draft mode (1/8 scale), which still reads every entropy-coded byte but
costs a fraction of a full decode.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "TIFF": "tif",
    "BMP": "bmp",
}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageCheck:
    status: str  # "ok", "not_an_image", "unsupported_format", "too_large" or "decode_error"
    error: str | None = None
    format: str | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    exif_orientation: int | None = None

    @property
    def extension(self) -> str | None:
        return EXTENSIONS.get(self.format or "")


def check_image(body: bytes, max_pixels: int) -> ImageCheck:
    if not body:
        return ImageCheck("not_an_image", "empty body")
    with warnings.catch_warnings():
        # Our own max_pixels check below replaces Pillow's process-wide bomb warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(body))
        except UnidentifiedImageError:
            return ImageCheck("not_an_image", f"unrecognised bytes starting {body[:8]!r}")
        except Image.DecompressionBombError as error:
            return ImageCheck("too_large", str(error))
        except (OSError, SyntaxError, ValueError) as error:
            return ImageCheck("decode_error", f"bad header: {error}")
    with image:
        width, height = image.size
        described = {"format": image.format, "width": width, "height": height, "mode": image.mode}
        if image.format not in EXTENSIONS:
            return ImageCheck("unsupported_format", f"{image.format} is not kept", **described)
        if width * height > max_pixels:
            return ImageCheck(
                "too_large", f"{width}x{height} exceeds {max_pixels} pixels", **described
            )
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION)
            if image.format == "JPEG":
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            return ImageCheck("decode_error", str(error), **described)
    return ImageCheck(
        "ok",
        exif_orientation=int(orientation) if isinstance(orientation, int) else None,
        **described,
    )


class ImageDecodeError(ValueError):
    """Bytes that cannot become an upright RGB image (corrupt, truncated, or too many pixels)."""


@dataclass(frozen=True)
class UprightImage:
    pixels: np.ndarray  # H x W x 3 uint8 RGB, EXIF orientation applied
    raw_size: tuple[int, int]  # (width, height) of the image as stored, before orientation
    orientation: int  # EXIF orientation (1 when absent)


def decode_upright(body: bytes, max_pixels: int) -> UprightImage:
    """Decode to upright 8-bit RGB: EXIF orientation applied, 16-bit scaled down, CMYK,
    palette and alpha converted. The pixel count is checked before decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(body))
            raw_size = image.size
            if raw_size[0] * raw_size[1] > max_pixels:
                raise ImageDecodeError(f"{raw_size[0]}x{raw_size[1]} exceeds {max_pixels} pixels")
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            image.load()
            upright = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            if isinstance(error, ImageDecodeError):
                raise
            raise ImageDecodeError(str(error)) from error
    return UprightImage(to_rgb8(upright), raw_size, orientation if 1 <= orientation <= 8 else 1)


def to_rgb8(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.int64)
        peak = 65535 if image.mode.startswith("I;16") else max(int(wide.max()), 1)
        gray = (wide.clip(0, peak) * 255 // peak).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def upright_to_raw(points: np.ndarray, orientation: int, raw_size: tuple[int, int]) -> np.ndarray:
    """Map (x, y) points from the upright image back to the stored pixel grid."""
    width, height = raw_size
    x, y = points[..., 0], points[..., 1]
    mapped = {
        1: (x, y),
        2: (width - x, y),  # mirrored
        3: (width - x, height - y),  # rotated 180
        4: (x, height - y),  # flipped
        5: (y, x),  # transposed
        6: (y, height - x),  # stored rotated 90 counter-clockwise, shown clockwise
        7: (width - y, height - x),  # transversed
        8: (width - y, x),  # stored rotated 90 clockwise, shown counter-clockwise
    }[orientation]
    return np.stack(mapped, axis=-1)
