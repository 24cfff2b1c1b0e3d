"""Sample images and a LAION-style source for the demo and the tests, made offline.

Photos come from files that ship inside installed packages (scikit-image's data folder, and
insightface's sample images when insightface is installed); other images are generated in
the formats the fetch stage must handle; faults cover every failure status.
"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from support.samplesite import Route

_EXIF_ORIENTATION = 0x0112


def package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def encode(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@dataclass(frozen=True)
class SampleRow:
    path: str | None  # served at this path; None: the url below is used as is
    caption: str
    expected_status: str
    route: Route | None = None
    url: str | None = None


def packaged_photos() -> dict[str, Path]:
    candidates = {
        "astronaut.png": ("skimage", "data/astronaut.png"),
        "camera.png": ("skimage", "data/camera.png"),
        "coffee.png": ("skimage", "data/coffee.png"),
        "chelsea.png": ("skimage", "data/chelsea.png"),
        "rocket.jpg": ("skimage", "data/rocket.jpg"),
        "t1.jpg": ("insightface", "data/images/t1.jpg"),
        "tom_hanks.png": ("insightface", "data/images/Tom_Hanks_54745.png"),
    }
    found = {name: package_file(*where) for name, where in candidates.items()}
    return {name: path for name, path in found.items() if path is not None}


def large_camera_photo(photos: dict[str, Path]) -> Image.Image:
    """A group photo at camera resolution, stored as a phone stores a portrait shot: pixels
    turned a quarter left, EXIF orientation 6 to show them upright. The packaged photos are
    small (their faces are under the paper's 128 px); this one, insightface's t1 (else the
    astronaut) enlarged 2x, has faces that pass."""
    source = photos.get("t1.jpg") or photos["astronaut.png"]
    with Image.open(source) as image:
        upright = image.convert("RGB")
    upright = upright.resize((upright.width * 2, upright.height * 2), Image.Resampling.BICUBIC)
    return upright.transpose(Image.Transpose.ROTATE_90)


def generated_images(
    base: Image.Image, large: Image.Image | None = None
) -> dict[str, tuple[bytes, str]]:
    """The formats fetch must keep: name -> (bytes, content type). `large` (stored turned,
    shown upright by its EXIF orientation 6) is the progressive JPEG when given."""
    small = base.resize((base.width // 2, base.height // 2))
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = 6
    gradient = np.linspace(0, 65535, 256 * 192, dtype=np.uint16).reshape(192, 256)
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
    frames = [Image.new("P", (64, 48), color) for color in (1, 2)]
    palette = small.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    return {
        "rotated_progressive.jpg": (
            encode(large or small, "JPEG", quality=90, progressive=True, exif=exif.tobytes()),
            "image/jpeg",
        ),
        "cmyk.jpg": (encode(small.convert("CMYK"), "JPEG", quality=90), "image/jpeg"),
        "gradient16.png": (encode(Image.fromarray(gradient), "PNG"), "image/png"),
        "palette_alpha.png": (encode(palette, "PNG"), "image/png"),
        "small.webp": (encode(small, "WEBP", quality=85), "image/webp"),
        "noise.jpg": (encode(noise, "JPEG", quality=80), "image/jpeg"),
        "animated.gif": (
            encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
            "image/gif",
        ),
    }


def sample_rows() -> list[SampleRow]:
    """Rows of the demo source, each with the fetch status it should get."""
    rows: list[SampleRow] = []
    content_types = {"png": "image/png", "jpg": "image/jpeg"}
    photos = packaged_photos()
    for name, path in photos.items():
        body = path.read_bytes()
        rows.append(
            SampleRow(
                f"photos/{name}",
                f"a photo: {name}",
                "ok",
                Route(body, content_types[name.rsplit(".", 1)[1]]),
            )
        )
    # Right after the original so both land in the first shard: dedup is per shard.
    astronaut = photos["astronaut.png"].read_bytes()
    mirror = SampleRow(
        "mirror/astronaut.png",
        "the same photo on a mirror",
        "duplicate",
        Route(astronaut, "image/png"),
    )
    rows.insert(1, mirror)
    base = Image.open(photos["astronaut.png"]).convert("RGB")
    for name, (body, content_type) in generated_images(base, large_camera_photo(photos)).items():
        rows.append(
            SampleRow(f"generated/{name}", f"generated {name}", "ok", Route(body, content_type))
        )
    jpeg = encode(base, "JPEG", quality=90)
    rows += [
        SampleRow("gone.jpg", "a deleted image", "http_error"),
        SampleRow(
            "broken-server.jpg",
            "a server error",
            "http_error",
            Route(b"oops", "text/plain", status=500),
        ),
        SampleRow(
            "page.jpg",
            "html served as a jpeg",
            "not_an_image",
            Route(b"<!doctype html><html><body>hi</body></html>", "image/jpeg"),
        ),
        SampleRow("empty.jpg", "zero bytes", "not_an_image", Route(b"", "image/jpeg")),
        SampleRow(
            "truncated.jpg",
            "a jpeg cut in half",
            "decode_error",
            Route(jpeg[: len(jpeg) // 2], "image/jpeg"),
        ),
        SampleRow(None, "no such host", "dns_error", url="http://no-such-host.invalid/a.jpg"),
        SampleRow(
            None, "nothing listens there", "connection_error", url="http://127.0.0.1:9/refused.jpg"
        ),
        SampleRow(None, "not a url", "invalid_url", url="not a url"),
        SampleRow(None, "wrong scheme", "invalid_url", url="ftp://127.0.0.1/a.jpg"),
    ]
    return rows


def routes_for(rows: list[SampleRow]) -> dict[str, Route]:
    return {row.path: row.route for row in rows if row.path is not None and row.route}


def write_source(rows: list[SampleRow], base_url: str, path: Path) -> Path:
    """A LAION-style parquet (SAMPLE_ID, URL, TEXT) pointing at `base_url`."""
    urls = [row.url if row.path is None else f"{base_url}/{row.path}" for row in rows]
    table = pa.table(
        {
            "SAMPLE_ID": pa.array(range(1000, 1000 + len(rows)), pa.int64()),
            "URL": urls,
            "TEXT": [row.caption for row in rows],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
