"""Hostile and awkward image bytes for the detect battery, built offline with Pillow.

Every image is a painting of one bright "face" patch on a dark background whose level varies
per image (identical bytes would be deduplicated away). The patch sits where the fake SCRFD
model of `tests/scrfd_model.py` reports its face once the picture is upright, so a published
box lands on the patch in the stored pixels exactly when pixels and boxes followed the same
orientation. EXIF blocks are written with Pillow's own TIFF directory writer, with field types
forced where a test needs a mistyped entry.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, TiffImagePlugin, TiffTags

EXIF_ORIENTATION = 0x0112
RESOLUTION_UNIT = 0x0128
MAKER_NOTE = 0x927C
UPRIGHT_SIZE = (1280, 960)  # (width, height): letterboxed at scale 2 into a 640 px input
PATCH_LEVEL = 250

# Pillow's transposes that make a stored picture upright, per EXIF orientation; the stored
# picture for an upright one is its inverse (orientations 6 and 8 are each other's).
TO_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
INVERSE = {2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def painting(patch_box: tuple[int, int, int, int], background: int) -> Image.Image:
    """An upright RGB picture: a white patch at `patch_box` (x1, y1, x2, y2) on grey."""
    pixels = np.full((UPRIGHT_SIZE[1], UPRIGHT_SIZE[0], 3), background, np.uint8)
    x1, y1, x2, y2 = patch_box
    pixels[y1:y2, x1:x2] = PATCH_LEVEL
    return Image.fromarray(pixels)


def stored_for(upright: Image.Image, orientation: int) -> Image.Image:
    """The picture to store so that EXIF `orientation` shows `upright`."""
    if orientation == 1:
        return upright
    return upright.transpose(TO_UPRIGHT[INVERSE[orientation]])


def exif_block(entries: dict[int, tuple[int, object]], byte_order: bytes = b"MM") -> bytes:
    """An `Exif\\0\\0` block whose IFD0 holds `{tag: (TIFF type, value)}` exactly as given."""
    head = byte_order + (b"\x00\x2a" if byte_order == b"MM" else b"\x2a\x00")
    head += (8).to_bytes(4, "big" if byte_order == b"MM" else "little")
    ifd = TiffImagePlugin.ImageFileDirectory_v2(ifh=head)
    for tag, (kind, value) in entries.items():
        ifd.tagtype[tag] = kind
        ifd[tag] = value
    return b"Exif\x00\x00" + head + ifd.tobytes(8)


def orientation_exif(value: int) -> bytes:
    return exif_block({EXIF_ORIENTATION: (TiffTags.SHORT, value)})


def raw_ifd_exif(entries: list[tuple[int, int, int, bytes]], claimed: int | None = None) -> bytes:
    """A big-endian `Exif\\0\\0` block packed by hand, for what Pillow's writer will not
    write (it trims a pair to one value for a single-valued tag): IFD0 entries
    `(tag, TIFF type, count, 4 value bytes)`, and the entry count it claims."""
    head = b"MM\x00\x2a" + struct.pack(">I", 8)
    count = struct.pack(">H", len(entries) if claimed is None else claimed)
    packed = b"".join(struct.pack(">HHI", t, k, n) + value for t, k, n, value in entries)
    return b"Exif\x00\x00" + head + count + packed + b"\x00\x00\x00\x00"


def truncated_ifd_exif() -> bytes:
    """IFD0 claims 500 entries; the block ends after the first (not Orientation)."""
    return raw_ifd_exif([(RESOLUTION_UNIT, TiffTags.SHORT, 1, struct.pack(">HH", 2, 0))], 500)


def orientation_pair_exif() -> bytes:
    """Orientation as a SHORT of count 2: (6, 6)."""
    return raw_ifd_exif([(EXIF_ORIENTATION, TiffTags.SHORT, 2, struct.pack(">HH", 6, 6))])


def ifd_past_end_exif() -> bytes:
    return b"Exif\x00\x00" + b"II\x2a\x00" + struct.pack("<I", 1_000_000)


def encode(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def patch_bounds(body: bytes) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of the bright patch in the stored pixels of `body`, first frame, no
    orientation applied: where a published box must land."""
    with Image.open(io.BytesIO(body)) as image:
        # Pillow's TIFF loader turns the raster by its Orientation tag: turn it back
        turned = image.tag_v2.get(EXIF_ORIENTATION, 1) if image.format == "TIFF" else 1
        image = stored_for(image.copy(), turned if turned in INVERSE else 1)
        if image.mode.startswith(("I", "F")):
            levels = np.asarray(image, dtype=np.float64)
            mask = levels >= 0.9 * levels.max()
        else:
            mask = np.asarray(image.convert("L")) > (PATCH_LEVEL - 40)
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
