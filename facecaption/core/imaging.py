"""Images with Pillow: whether downloaded bytes are an image we keep (without re-encoding),
and decoding kept images upright for the later stages.

The format comes from the bytes (Pillow's magic-number sniffing), never from a Content-Type
header. Pixel count is checked from the header before any decoding, as a guard against
decompression bombs. The image is then fully decoded once to catch truncated or corrupt
files; JPEGs decode in draft mode (1/8 scale), which still reads every entropy-coded byte but
costs a fraction of a full decode. A camera's multi-picture JPEG (Pillow's "MPO": stereo
pairs, previews) is a JPEG whose first image every decoder shows, the others stored after
it: it is kept as JPEG, and its first image is the one used.

Orientation: `exif_orientation` is the one function that decides how an image is turned
upright. Fetch records its answer and detect applies it to the pixels and maps the boxes back
with it, so the two always agree. It reads the EXIF Orientation entry of IFD0 itself (a SHORT
of count 1 holding 1-8, as the TIFF/EXIF specs and browsers' decoders require) instead of
trusting Pillow's lenient parse: anything else (text "6", a list, 0 or 9, an IFD that runs
past its block, a block that is not TIFF) leaves the image as stored, with the reason
(`EXIF_UNREADABLE`, `EXIF_ORIENTATION_INVALID`) for the stage to count. The transpose is ours
too (`ImageOps.exif_transpose` re-serialises the whole EXIF block, which raises
`struct.error` on any mistyped tag beside Orientation).
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "TIFF": "tif",
    "BMP": "bmp",
}
# Formats kept under another's name: an MPO's first image is a plain JPEG stream.
SAME_AS = {"MPO": "JPEG"}
EXIF_ORIENTATION_TAG = 0x0112
TIFF_SHORT = 3  # the TIFF field type EXIF requires for Orientation
EXIF_HEADER = b"Exif\x00\x00"
IFD_ENTRY_BYTES = 12

# The orientation that undoes each one (6 and 8 turn opposite ways; the others undo themselves).
INVERSE_ORIENTATION = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}

# Why an image's EXIF orientation was not followed (the image is then used as stored).
EXIF_UNREADABLE = "exif_unreadable"
EXIF_ORIENTATION_INVALID = "exif_orientation_invalid"

# Why an image that fetch kept could not be decoded for detection.
DECODE_ERROR = "decode_error"  # truncated or corrupt
TOO_LARGE = "too_large"  # more pixels than allowed: not decoded at all
UNSUPPORTED_MODE = "unsupported_mode"  # a pixel layout we cannot turn into RGB

# What Pillow's format plugins raise on malformed files (its fuzzers' list, plus the errors
# of the struct/int parsing inside them): the input's fault, never ours.
PILLOW_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ArithmeticError,
    Image.DecompressionBombError,
)


@dataclass(frozen=True)
class Orientation:
    """The EXIF orientation applied to an image (1: as stored), and why the file's own
    value was not followed, if it was not."""

    value: int = 1
    problem: str | None = None  # EXIF_UNREADABLE or EXIF_ORIENTATION_INVALID


def parse_exif_orientation(exif: bytes) -> Orientation:
    """The Orientation entry of an EXIF block's IFD0 (a TIFF structure, with or without the
    `Exif\\0\\0` prefix JPEG uses). Never raises: malformed input is a typed problem."""
    data = exif.removeprefix(EXIF_HEADER).removeprefix(EXIF_HEADER)
    if not data:
        return Orientation()
    try:
        order = {b"II": "<", b"MM": ">"}.get(data[:2])
        if order is None or len(data) < 8:
            return Orientation(1, EXIF_UNREADABLE)
        magic, ifd_offset = struct.unpack_from(order + "HI", data, 2)
        if magic != 42 or ifd_offset + 2 > len(data):
            return Orientation(1, EXIF_UNREADABLE)
        (entries,) = struct.unpack_from(order + "H", data, ifd_offset)
        for index in range(entries):
            at = ifd_offset + 2 + index * IFD_ENTRY_BYTES
            if at + IFD_ENTRY_BYTES > len(data):
                return Orientation(1, EXIF_UNREADABLE)
            tag, kind, count = struct.unpack_from(order + "HHI", data, at)
            if tag != EXIF_ORIENTATION_TAG:
                continue
            if kind != TIFF_SHORT or count != 1:
                return Orientation(1, EXIF_ORIENTATION_INVALID)
            (value,) = struct.unpack_from(order + "H", data, at + 8)
            return (
                Orientation(value)
                if value in range(1, 9)
                else Orientation(1, EXIF_ORIENTATION_INVALID)
            )
    except struct.error:  # bounds are checked above; this only guards the arithmetic
        return Orientation(1, EXIF_UNREADABLE)
    return Orientation()


def exif_orientation(image: Image.Image, body: bytes) -> Orientation:
    """How `image` (opened from `body`, and loaded: PNG keeps an eXIf chunk after its pixels)
    is turned upright. EXIF only: XMP orientation is ignored, as browsers ignore it."""
    if image.format == "TIFF":  # the file is itself the TIFF structure EXIF borrows
        return parse_exif_orientation(body)
    exif = image.info.get("exif")
    if exif is None and "Raw profile type exif" in image.info:  # ImageMagick's PNG text chunk
        try:
            exif = bytes.fromhex("".join(str(image.info["Raw profile type exif"]).split("\n")[3:]))
        except ValueError:
            return Orientation(1, EXIF_UNREADABLE)
    if not isinstance(exif, bytes | bytearray):
        return Orientation()
    return parse_exif_orientation(bytes(exif))


@dataclass(frozen=True)
class ImageCheck:
    status: str  # "ok", "not_an_image", "unsupported_format", "too_large" or "decode_error"
    error: str | None = None
    format: str | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    exif_orientation: int | None = None  # the orientation detect applies (1: as stored)

    @property
    def extension(self) -> str | None:
        return EXTENSIONS.get(self.format or "")


def check_image(body: bytes, max_pixels: int) -> ImageCheck:
    if not body:
        return ImageCheck("not_an_image", "empty body")
    with warnings.catch_warnings():
        # Our own max_pixels check below replaces Pillow's process-wide bomb warning; the
        # metadata warnings of odd files say nothing a status would not.
        warnings.simplefilter("ignore")
        try:
            image = Image.open(io.BytesIO(body))
        except UnidentifiedImageError:
            return ImageCheck("not_an_image", f"unrecognised bytes starting {body[:8]!r}")
        except Image.DecompressionBombError as error:
            return ImageCheck("too_large", str(error))
        except PILLOW_INPUT_ERRORS as error:
            return ImageCheck("decode_error", f"bad header: {_describe(error)}")
        with image:
            try:
                width, height = stored_size(image)  # TIFF: parses its Orientation tag
            except PILLOW_INPUT_ERRORS as error:
                return ImageCheck("decode_error", f"bad header: {_describe(error)}")
            kept_as = SAME_AS.get(image.format or "", image.format)
            described = {
                "format": kept_as,
                "width": width,
                "height": height,
                "mode": image.mode,
            }
            if kept_as not in EXTENSIONS:
                return ImageCheck("unsupported_format", f"{image.format} is not kept", **described)
            if width * height > max_pixels:
                return ImageCheck(
                    "too_large", f"{width}x{height} exceeds {max_pixels} pixels", **described
                )
            if width < 1 or height < 1:
                return ImageCheck("decode_error", f"{width}x{height}: no pixels", **described)
            try:
                if kept_as == "JPEG":
                    image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                image.load()
            except PILLOW_INPUT_ERRORS as error:
                return ImageCheck("decode_error", _describe(error), **described)
            orientation = exif_orientation(image, body)
    return ImageCheck("ok", exif_orientation=orientation.value, **described)


class ImageDecodeError(ValueError):
    """Bytes that cannot become an upright RGB image; `reason` is DECODE_ERROR, TOO_LARGE or
    UNSUPPORTED_MODE."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class UprightImage:
    pixels: np.ndarray  # H x W x 3 uint8 RGB, EXIF orientation applied
    raw_size: tuple[int, int]  # (width, height) of the image as stored, before orientation
    orientation: int  # the EXIF orientation applied (1: none, or the file's was not usable)
    orientation_problem: str | None = None  # why the file's orientation was not followed


def decode_upright(body: bytes, max_pixels: int) -> UprightImage:
    """Decode to upright 8-bit RGB: EXIF orientation applied (see `exif_orientation`), 16-bit
    scaled down, CMYK, palette and alpha converted, the first frame of an animation. The pixel
    count is checked before decoding. Any fault of the bytes is an ImageDecodeError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bomb and metadata warnings: the checks below decide
        try:
            with Image.open(io.BytesIO(body)) as image:
                raw_size = stored_size(image)
                loader_turn = loader_orientation(image)
                if raw_size[0] * raw_size[1] > max_pixels:
                    raise ImageDecodeError(
                        TOO_LARGE, f"{raw_size[0]}x{raw_size[1]} exceeds {max_pixels} pixels"
                    )
                if min(raw_size) < 1:
                    raise ImageDecodeError(DECODE_ERROR, f"{raw_size}: no pixels")
                image.load()
                orientation = exif_orientation(image, body)
                # back to the stored raster when Pillow's loader turned it by itself
                pixels = orient(to_rgb8(image), INVERSE_ORIENTATION[loader_turn])
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as error:
            raise ImageDecodeError(TOO_LARGE, str(error)) from error
        except UnsupportedModeError as error:
            raise ImageDecodeError(UNSUPPORTED_MODE, str(error)) from error
        except PILLOW_INPUT_ERRORS as error:
            raise ImageDecodeError(DECODE_ERROR, _describe(error)) from error
    return UprightImage(
        orient(pixels, orientation.value), raw_size, orientation.value, orientation.problem
    )


def loader_orientation(image: Image.Image) -> int:
    """The orientation Pillow's own loader applies on `load()` (1: none). Its TIFF plugin
    transposes by the file's Orientation tag, read leniently (a pair (6, 6) counts as 6)."""
    if image.format != "TIFF":
        return 1
    value = image.tag_v2.get(EXIF_ORIENTATION_TAG)
    return value if isinstance(value, int) and value in range(2, 9) else 1


def stored_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the raster as stored in the file, whatever Pillow reports (its TIFF
    plugin reports the size after its own turn)."""
    width, height = image.size
    return (height, width) if loader_orientation(image) in range(5, 9) else (width, height)


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels turned upright for an EXIF orientation, as Pillow's transposes would."""
    turned = {
        1: pixels,
        2: pixels[:, ::-1],  # FLIP_LEFT_RIGHT
        3: pixels[::-1, ::-1],  # ROTATE_180
        4: pixels[::-1],  # FLIP_TOP_BOTTOM
        5: pixels.swapaxes(0, 1),  # TRANSPOSE
        6: np.rot90(pixels, -1),  # ROTATE_270 (counter-clockwise), i.e. 90 clockwise
        7: np.rot90(pixels, 2).swapaxes(0, 1),  # TRANSVERSE
        8: np.rot90(pixels, 1),  # ROTATE_90 (counter-clockwise)
    }[orientation]
    return np.ascontiguousarray(turned)


class UnsupportedModeError(ValueError):
    """A pixel layout with no conversion to RGB."""


def to_rgb8(image: Image.Image) -> np.ndarray:
    """H x W x 3 uint8 RGB of any Pillow mode: 16/32-bit integer and float images are scaled
    to their range (16-bit to 65535, others to their own maximum)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        wide = np.nan_to_num(np.asarray(image, dtype=np.float64))
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(wide.max()), 1.0)
        gray = (wide.clip(0, peak) * 255 // peak).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    try:
        rgb = image.convert("RGB")
    except ValueError as error:  # Pillow: "conversion from X to RGB not supported"
        raise UnsupportedModeError(f"{image.mode}: {error}") from error
    return np.asarray(rgb, dtype=np.uint8)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


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
