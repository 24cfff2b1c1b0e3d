"""A tiny CelebA in the Hub schema (flwrlabs/celeba, `img_align+identity+attr`) and a tiny
image backbone, both built offline, for the attribute-training tests.

Images are 44 x 54 JPEG-free PNGs shaped like CelebA's aligned crops (scaled from 178 x 218),
with CelebA's landmark columns. Two hidden bits decide the labels: `bright` (the face region's
brightness) and `warm` (red against blue); even attributes follow `bright`, odd ones `warm`,
each flipped with probability `LABEL_NOISE`, so a model can learn them and still be unsure.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from facecaption.attribute.celeba import CELEBA_MEAN_LANDMARKS, LANDMARK_COLUMNS
from facecaption.attribute.labels import CELEBA_ATTRIBUTES

WIDTH, HEIGHT = 44, 54
LABEL_NOISE = 0.1
SCALE = WIDTH / 178


def synthetic_rows(count: int, seed: int) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {"image": [], "celeb_id": []}
    columns.update({name: [] for name in CELEBA_ATTRIBUTES})
    columns.update({name: [] for name in LANDMARK_COLUMNS})
    for row in range(count):
        bright, warm = rng.random() < 0.5, rng.random() < 0.4
        base = np.array([200, 120, 60] if warm else [60, 120, 200], dtype=np.float64)
        base *= 1.0 if bright else 0.45
        pixels = base + rng.normal(0, 25, (HEIGHT, WIDTH, 3))
        jitter = rng.normal(0, 0.8, (5, 2))
        points = CELEBA_MEAN_LANDMARKS * SCALE + jitter
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        columns["image"].append({"bytes": buffer.getvalue(), "path": f"{row:06d}.png"})
        columns["celeb_id"].append(int(rng.integers(1, 100)))
        for i, name in enumerate(CELEBA_ATTRIBUTES):
            truth = bright if i % 2 == 0 else warm
            columns[name].append(bool(truth ^ (rng.random() < LABEL_NOISE)))
        for name, value in zip(LANDMARK_COLUMNS, points.reshape(-1), strict=True):
            columns[name].append(int(round(value)))
    return columns


def write_synthetic_celeba(
    folder: Path, sizes: dict[str, int], *, landmarks: bool = True, drop: tuple[str, ...] = ()
) -> Path:
    """`{folder}/img_align+identity+attr/{split}-00000-of-00001.parquet`, as on the Hub."""
    target = Path(folder) / "img_align+identity+attr"
    target.mkdir(parents=True, exist_ok=True)
    for seed, (split, count) in enumerate(sizes.items()):
        columns = synthetic_rows(count, seed)
        for name in drop + (() if landmarks else LANDMARK_COLUMNS):
            columns.pop(name)
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        arrays = {
            name: pa.array(values, type=image_type if name == "image" else None)
            for name, values in columns.items()
        }
        pq.write_table(pa.table(arrays), target / f"{split}-00000-of-00001.parquet")
    return Path(folder)


def build_tiny_resnet(folder: Path, *, seed: int = 0) -> Path:
    """A random transformers ResNet (`ResNetModel`: a backbone without a head), saved with
    `save_pretrained` as a pretrained one on the Hub would be."""
    import torch
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
    )
    torch.manual_seed(seed)
    ResNetModel(config).save_pretrained(folder)
    return Path(folder)
