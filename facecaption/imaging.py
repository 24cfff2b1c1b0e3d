"""Deciding whether downloaded bytes are an image we keep, with Pillow, without re-encoding.

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

from PIL import Image, UnidentifiedImageError

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
