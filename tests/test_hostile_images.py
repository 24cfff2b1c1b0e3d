"""The detect battery: hostile and awkward images served over loopback through the real fetch
and detect stages (real onnxruntime + insightface decoding a fake SCRFD whose answer is known).

Each bad image sits in its own shard between two good neighbours. For each one: the typed
count it adds (or the face it gives, its box on the face patch of the stored pixels), the
neighbours' face rows equal to a lone good image's, both stages `done`, and a forced re-run
of both stages leaves every artifact byte-identical.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps, TiffTags
from PIL.PngImagePlugin import PngInfo
from scrfd_model import build_scrfd_onnx
from support.hostile_images import (
    EXIF_ORIENTATION,
    MAKER_NOTE,
    RESOLUTION_UNIT,
    encode,
    exif_block,
    ifd_past_end_exif,
    orientation_exif,
    orientation_pair_exif,
    painting,
    patch_bounds,
    stored_for,
    truncated_ifd_exif,
)
from support.samplesite import Route, SampleSite
from test_detect import DET_FACE
from test_fetch import routes_source

from facecaption.core.imaging import (
    EXIF_ORIENTATION_INVALID,
    EXIF_UNREADABLE,
    parse_exif_orientation,
)
from facecaption.core.pipeline import Pipeline
from facecaption.core.writers import WebDatasetWriter, iter_webdataset
from facecaption.settings import DetectSettings

SCALE = 2  # a 1280 x 960 upright picture fills the 640 px detector input at half size
PATCH = tuple(int(v * SCALE) for v in DET_FACE["box"])  # where the fake model sees the face
DETECT_MAX_PIXELS = 2_000_000  # below fetch's limit: a "bomb" passes fetch, not detect
ROW_ID_FIELDS = ("face_id", "key")


@dataclass
class BadImage:
    name: str
    body: bytes
    counts: dict[str, int] = field(default_factory=dict)  # typed detect counts it adds
    faces: int = 1  # faces kept from it
    orientation: int = 1  # the orientation fetch and detect must both record
    tamper: bool = False  # replace its bytes in fetch.tar by a truncated copy after fetch
    format: str | None = None  # the format fetch must record for it, when the test says


def raw_profile(exif: bytes) -> PngInfo:
    """ImageMagick's way of putting EXIF in a PNG: hex in a text chunk."""
    info = PngInfo()
    data = exif.removeprefix(b"Exif\x00\x00")
    info.add_text("Raw profile type exif", f"\nexif\n{len(data):8}\n{data.hex()}\n")
    return info


def picture(index: int, orientation: int = 1) -> Image.Image:
    return stored_for(painting(PATCH, background=16 + index), orientation)


def jpeg(index: int, exif: bytes | None, orientation: int = 1) -> bytes:
    options = {"exif": exif} if exif is not None else {}
    return encode(picture(index, orientation), "JPEG", quality=95, **options)


def mpo(first: Image.Image, exif: bytes | None) -> bytes:
    """A multi-picture JPEG as stereo cameras write it: `first`, then a second picture."""
    second = painting((0, 0, 200, 200), background=120).resize(first.size)
    options = {"exif": exif} if exif is not None else {}
    body = encode(first, "MPO", quality=95, save_all=True, append_images=[second], **options)
    with Image.open(io.BytesIO(body)) as image:
        assert (image.format, image.n_frames) == ("MPO", 2)
    return body


@pytest.fixture
def detect_settings(tmp_path, settings):
    model = build_scrfd_onnx(tmp_path / "scrfd.onnx", [DET_FACE])
    detect = DetectSettings(model_path=str(model), max_pixels=DETECT_MAX_PIXELS)
    return settings.model_copy(update={"detect": detect, "shard_size": 3})


def _artifacts(pipeline: Pipeline, shard_id: str, tampered: bool) -> dict[str, str]:
    """Checksums of both stages' artifacts (fetch.tar's recorded one is stale once tampered)."""
    return {
        f"{stage}/{name}": ref["sha256"]
        for stage in ("fetch", "detect")
        for name, ref in pipeline.state.get_stage(shard_id, stage).artifacts.items()
        if not (tampered and name == "fetch.tar")
    }


def _tamper(pipeline: Pipeline, shard_id: str, key: str) -> None:
    """Cut one image in fetch.tar in half, as a storage fault would after fetch checked it."""
    path = Path(pipeline.store.shard_path(shard_id, "fetch.tar"))
    with open(path, "rb") as handle:
        members = list(iter_webdataset(handle))
    with WebDatasetWriter(path) as out:
        for member_key, ext, payload in members:
            cut = member_key == key and ext != "json"
            out.write(member_key, {ext: payload[: len(payload) // 2] if cut else payload})


def run_battery(tmp_path: Path, settings, bad: list[BadImage]) -> None:
    """Fetch and detect a shard per bad image (good, bad, good) and check each one."""
    routes, paths = {}, []
    for index, image in enumerate(bad):
        before, after = f"{index}/before.png", f"{index}/after.png"
        routes[before] = Route(encode(picture(2 * index), "PNG"), "image/png")
        routes[f"{index}/{image.name}"] = Route(image.body)
        routes[after] = Route(encode(picture(2 * index + 1), "PNG"), "image/png")
        paths += [before, f"{index}/{image.name}", after]
    with SampleSite(routes) as site, Pipeline.open(settings) as pipeline:
        shard_ids = pipeline.select_shards([str(routes_source(tmp_path, site, paths))])
        assert len(shard_ids) == len(bad)
        for shard_id, image in zip(shard_ids, bad, strict=True):
            pipeline.run("fetch", shard_id)
            if image.tamper:
                _tamper(
                    pipeline, shard_id, f"{pipeline.state.get_shard(shard_id).row_start + 1:09d}"
                )
            pipeline.run("detect", shard_id)
        reference = None
        failures = []
        for shard_id, image in zip(shard_ids, bad, strict=True):
            shard = pipeline.state.get_shard(shard_id)
            keys = [f"{row:09d}" for row in range(shard.row_start, shard.row_end)]
            fetch = pipeline.state.get_stage(shard_id, "fetch")
            detect = pipeline.state.get_stage(shard_id, "detect")
            fetched = {
                r["key"]: r
                for r in pq.read_table(fetch.artifacts["fetch.parquet"]["uri"]).to_pylist()
            }
            faces = pq.read_table(detect.artifacts["faces.parquet"]["uri"]).to_pylist()
            by_key = {key: [f for f in faces if f["key"] == key] for key in keys}
            problems = []
            if (fetch.status, detect.status) != ("done", "done"):
                problems.append(f"stages {fetch.status}/{detect.status}")
            if fetched[keys[1]]["status"] != "ok":
                problems.append(f"fetch status {fetched[keys[1]]['status']}")
            if image.format and fetched[keys[1]]["format"] != image.format:
                problems.append(f"fetch format {fetched[keys[1]]['format']}, not {image.format}")
            for name, value in image.counts.items():
                if detect.counts.get(name, 0) != value:
                    problems.append(f"count {name} = {detect.counts.get(name, 0)}, not {value}")
            if len(by_key[keys[1]]) != image.faces:
                problems.append(f"{len(by_key[keys[1]])} faces, not {image.faces}")
            for face in by_key[keys[1]]:
                box = [face[c] for c in ("x1", "y1", "x2", "y2")]
                bounds = patch_bounds(image.body)
                if not np.allclose(box, bounds, atol=2):
                    problems.append(f"box {box} is not on the face patch at {list(bounds)}")
                recorded = (fetched[keys[1]]["exif_orientation"], face["exif_orientation"])
                if recorded != (image.orientation, image.orientation):
                    problems.append(f"orientation fetch/detect {recorded}, not {image.orientation}")
            for key in (keys[0], keys[2]):
                [neighbour] = by_key[key] or [None]
                if neighbour is None:
                    problems.append(f"neighbour {key} lost its face")
                    continue
                row = {k: v for k, v in neighbour.items() if k not in ROW_ID_FIELDS}
                reference = reference or row
                if row != reference:
                    problems.append(f"neighbour {key} changed: {row} != {reference}")
            before = _artifacts(pipeline, shard_id, image.tamper), dict(detect.counts)
            pipeline.run("fetch", shard_id, force=True)
            pipeline.run("detect", shard_id, force=True)
            again = pipeline.state.get_stage(shard_id, "detect")
            if image.tamper:
                # fetch.tar is not the size recorded for it: the re-run fetches it again
                if again.counts.get("decode_error", 0):
                    problems.append("a forced re-run kept the damaged image")
            elif (_artifacts(pipeline, shard_id, image.tamper), dict(again.counts)) != before:
                problems.append("a forced re-run changed its outputs")
            failures += [f"{image.name}: {problem}" for problem in problems]
    assert reference is not None and [reference[c] for c in ("x1", "y1", "x2", "y2")] == list(PATCH)
    assert not failures, "\n".join(failures)


def test_every_exif_orientation_puts_the_published_box_on_the_face(tmp_path, detect_settings):
    """Pixels and boxes follow one orientation decision, in every container EXIF comes in."""
    mistyped = exif_block(
        {EXIF_ORIENTATION: (TiffTags.SHORT, 6), RESOLUTION_UNIT: (TiffTags.ASCII, "inch")}
    )
    with Image.open(io.BytesIO(jpeg(0, mistyped, 6))) as image, pytest.raises(struct.error):
        ImageOps.exif_transpose(image)  # what made the detect stage fail before
    huge = exif_block(
        {
            EXIF_ORIENTATION: (TiffTags.SHORT, 6),
            MAKER_NOTE: (TiffTags.UNDEFINED, b"\x00" * 4_000_000),
        }
    )
    bad = [
        BadImage(f"jpeg-orientation-{o}.jpg", jpeg(o, orientation_exif(o), o), orientation=o)
        for o in range(1, 9)
    ]
    bad += [
        BadImage("png-exif-6.png", encode(picture(9, 6), "PNG", exif=orientation_exif(6)),
                 orientation=6),
        BadImage("webp-exif-8.webp", encode(picture(10, 8), "WEBP", lossless=True,
                                             exif=orientation_exif(8)), orientation=8),
        BadImage("tiff-orientation-6.tif", encode(picture(11, 6), "TIFF",
                                                  exif=orientation_exif(6)), orientation=6),
        BadImage("little-endian-3.jpg",
                 jpeg(12, exif_block({EXIF_ORIENTATION: (TiffTags.SHORT, 3)}, b"II"), 3),
                 orientation=3),
        # a mistyped tag beside a valid Orientation: the orientation is followed
        BadImage("mistyped-neighbour-tag.jpg", jpeg(13, mistyped, 6), orientation=6),
        BadImage("huge-exif-4mb.png", encode(picture(14, 6), "PNG", exif=huge), orientation=6),
        BadImage("png-raw-profile-exif-6.png", encode(picture(15, 6), "PNG",
                                                      pnginfo=raw_profile(orientation_exif(6))),
                 orientation=6),
        # a camera's multi-picture JPEG (MPO): kept as JPEG, its first picture used, whose
        # EXIF is followed; the second (its patch elsewhere) is never looked at
        BadImage("multi-picture-orientation-6.jpg", mpo(picture(16, 6), orientation_exif(6)),
                 orientation=6, format="JPEG"),
        BadImage("multi-picture.jpg", mpo(picture(17), None), format="JPEG"),
    ]  # fmt: skip
    run_battery(tmp_path, detect_settings, bad)


def test_exif_orientation_garbage_leaves_the_image_as_stored_and_is_counted(
    tmp_path, detect_settings
):
    invalid = {EXIF_ORIENTATION_INVALID: 1, EXIF_UNREADABLE: 0}
    unreadable = {EXIF_UNREADABLE: 1, EXIF_ORIENTATION_INVALID: 0}
    garbage = {
        "orientation-text-6.jpg": (exif_block({EXIF_ORIENTATION: (TiffTags.ASCII, "6")}), invalid),
        "orientation-pair-6-6.jpg": (orientation_pair_exif(), invalid),
        "orientation-0.jpg": (orientation_exif(0), invalid),
        "orientation-9.jpg": (orientation_exif(9), invalid),
        "orientation-65535.jpg": (orientation_exif(65535), invalid),
        "orientation-as-long.jpg": (exif_block({EXIF_ORIENTATION: (TiffTags.LONG, 6)}), invalid),
        "orientation-as-rational.jpg": (
            exif_block({EXIF_ORIENTATION: (TiffTags.RATIONAL, 6.0)}),
            invalid,
        ),
        "exif-not-tiff.jpg": (b"Exif\x00\x00" + b"\x89garbage" * 40, unreadable),
        "exif-ifd-past-end.jpg": (ifd_past_end_exif(), unreadable),
        "exif-ifd-truncated.jpg": (truncated_ifd_exif(), unreadable),
    }
    profile = PngInfo()
    profile.add_text("Raw profile type exif", "\nexif\n      12\nnot hex at all\n")
    bad = []
    for index, (name, (exif, counts)) in enumerate(garbage.items()):
        assert parse_exif_orientation(exif).problem == next(k for k, v in counts.items() if v)
        bad.append(BadImage(name, jpeg(index, exif), counts, orientation=1))
    bad.append(
        BadImage("png-raw-profile-not-hex.png", encode(picture(20), "PNG", pnginfo=profile),
                 unreadable, orientation=1)
    )  # fmt: skip
    run_battery(tmp_path, detect_settings, bad)


def test_decode_faults_after_fetch_are_counted_per_image(tmp_path, detect_settings):
    upright = picture(0)
    gray16 = np.where(np.asarray(upright)[:, :, 0] > 128, 65535, 9000).astype(np.uint16)
    floats = np.where(np.asarray(upright)[:, :, 0] > 128, 1.0, 0.1).astype(np.float32)
    palette = picture(3).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = 0
    second_frame = painting((0, 0, 64, 64), background=99)
    bad = [
        BadImage("truncated-after-check.jpg", jpeg(1, None), {"decode_error": 1}, faces=0,
                 tamper=True),
        BadImage("bomb-by-dimensions.png", encode(Image.new("L", (2000, 1500), 7), "PNG"),
                 {"too_large": 1}, faces=0),
        BadImage("gray-16-bit.png", encode(Image.fromarray(gray16), "PNG")),
        BadImage("float-32-bit.tif", encode(Image.fromarray(floats), "TIFF")),
        BadImage("cmyk.jpg", encode(picture(2).convert("CMYK"), "JPEG", quality=95)),
        BadImage("palette-transparency.png", encode(palette, "PNG")),
        BadImage("gray-alpha.png", encode(picture(4).convert("LA"), "PNG")),
        BadImage("animated.gif", encode(picture(5).convert("P"), "GIF", save_all=True,
                                        append_images=[second_frame.convert("P")], duration=50)),
        BadImage("animated.webp", encode(picture(6), "WEBP", lossless=True, save_all=True,
                                         append_images=[second_frame], duration=50)),
        BadImage("one-pixel.png", encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
                 {"dropped_too_small": 1}, faces=0),
        BadImage("sliver-1x3000.png", encode(Image.new("RGB", (1, 3000), (9, 9, 9)), "PNG"),
                 {"faces_detected": 2}, faces=0),  # only the neighbours' faces
    ]  # fmt: skip
    run_battery(tmp_path, detect_settings, bad)
