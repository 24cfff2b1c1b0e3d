"""CelebA in the Hugging Face schema, read for training: its splits, its 40 labels, and the
face crops made from its images as the pipeline makes them (aligned and resized the same way;
decoded without EXIF orientation, which CelebA's images do not carry).

The schema is that of `flwrlabs/celeba`, config `img_align+identity+attr`: an `image` column
(the datasets Image feature, stored as a struct with `bytes`, or plain bytes) and one column per
attribute named as CelebA names them (`5_o_Clock_Shadow` ... `Young`), boolean (integers count
as true above 0, so CelebA's own -1/1 works too); splits `train`, `valid` (or `validation`) and
`test`. Other columns are ignored. A dataset is either a Hub id with an optional config
(`flwrlabs/celeba:img_align+identity+attr`, read with `datasets.load_dataset`, which honours
HF_ENDPOINT and HF_TOKEN) or a local folder of parquet files whose names or folders start with
the split name (`train-00000-of-00019.parquet`, `valid/0000.parquet`, ...).

Crops: the pipeline's attribute stage sees faces cut by `facecaption.detect.align` (five-point
similarity alignment onto the ArcFace template, at the face's native resolution) and then
resized by the model's sidecar preprocessing. Training sees the same: each image is aligned
with five landmarks, by the first source that has them (`align`):

- `landmarks`: CelebA's own, from columns `lefteye_x`, `lefteye_y`, `righteye_x`, ...,
  `rightmouth_y` (image left/right, as CelebA's `list_landmarks_align_celeba.txt`);
- `detector`: the configured face detector's best face (the packaged RetinaFace offline), run
  once per image and kept in the work folder (`landmarks-{split}.npy`);
- `celeba-mean`: one fixed set, roughly where CelebA puts them (`CELEBA_MEAN_LANDMARKS`);
  right for `img_align` images only (they are already eye-aligned), approximate per face.

`auto` takes the columns when the dataset has them, else the detector. An image in which the
detector finds no face falls back to the fixed set and is counted. An image cell that does not
decode is outside data, not a fault: its face is left out of the loss and the metrics and
counted (`training.CropDataset` marks it), so one broken cell never stops a run. A dataset
whose columns are not the 40 attributes is refused before anything runs (DatasetError).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from facecaption.attribute.labels import CELEBA_ATTRIBUTES
from facecaption.attribute.options import ALIGN_CHOICES
from facecaption.core.errors import PermanentError

SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"valid": ("valid", "validation", "val")}
IMAGE_COLUMN = "image"
LANDMARK_COLUMNS = (
    "lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
    "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y",
)  # fmt: skip
# Where CelebA's img_align images put a face's five points, roughly (eyes near (69, 111) and
# (108, 111) in the 178 x 218 image): a fallback, approximate per face, not measured here.
CELEBA_MEAN_LANDMARKS = np.array(
    [[69.0, 111.0], [108.0, 111.0], [88.0, 134.0], [72.0, 152.0], [106.0, 152.0]]
)


class DatasetError(PermanentError, ValueError):
    """The dataset is not CelebA-40 in the Hub schema: the message says what is missing."""


@dataclass
class CelebaSplit:
    """One split as a pyarrow table plus its labels (faces x 40, CelebA order, float32)."""

    name: str
    table: object  # pyarrow.Table (memory-mapped where the source allows)
    labels: np.ndarray
    landmarks: np.ndarray | None  # (faces, 5, 2) from the columns, else None

    def __len__(self) -> int:
        return len(self.labels)

    def image_bytes(self, index: int) -> bytes | None:
        cell = self.table.column(IMAGE_COLUMN)[int(index)].as_py()
        if isinstance(cell, dict):
            cell = cell.get("bytes")
        return cell if isinstance(cell, bytes | bytearray) else None

    def limited(self, rows: int | None) -> CelebaSplit:
        if rows is None or rows >= len(self):
            return self
        landmarks = None if self.landmarks is None else self.landmarks[:rows]
        return CelebaSplit(self.name, self.table.slice(0, rows), self.labels[:rows], landmarks)


def decode_rgb(data: bytes | None) -> np.ndarray | None:
    """An image cell -> H x W x 3 uint8 RGB, or None when it is not a decodable image."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def check_schema(columns: list[str], where: str) -> None:
    """DatasetError unless there is an image column and every CelebA attribute column."""
    missing = [name for name in (IMAGE_COLUMN, *CELEBA_ATTRIBUTES) if name not in columns]
    if missing:
        others = sorted(set(columns) - {IMAGE_COLUMN, *CELEBA_ATTRIBUTES, *LANDMARK_COLUMNS})
        raise DatasetError(
            f"{where} is not CelebA-40 in the Hugging Face schema (an `image` column and one"
            f" boolean column per attribute, named as CelebA names them): missing"
            f" {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} of"
            f" {len(CELEBA_ATTRIBUTES) + 1}); other columns: {others[:8]}"
        )


def split_from_table(name: str, table, where: str) -> CelebaSplit:  # noqa: ANN001
    import pyarrow as pa

    check_schema(table.column_names, f"{where} ({name} split)")
    labels = np.empty((table.num_rows, len(CELEBA_ATTRIBUTES)), dtype=np.float32)
    for i, attribute in enumerate(CELEBA_ATTRIBUTES):
        column = table.column(attribute)
        if pa.types.is_boolean(column.type):
            values = column.to_numpy(zero_copy_only=False)
        elif pa.types.is_integer(column.type):
            values = column.to_numpy(zero_copy_only=False) > 0
        else:
            raise DatasetError(
                f"{where} ({name} split): column {attribute} is {column.type}, not boolean"
            )
        if column.null_count:
            raise DatasetError(f"{where} ({name} split): column {attribute} has missing values")
        labels[:, i] = values
    landmarks = None
    if all(column in table.column_names for column in LANDMARK_COLUMNS):
        points = np.stack(
            [table.column(c).to_numpy(zero_copy_only=False) for c in LANDMARK_COLUMNS], axis=1
        )
        landmarks = points.astype(np.float64).reshape(-1, 5, 2)
    return CelebaSplit(name, table.select([IMAGE_COLUMN]), labels, landmarks)


def load_splits(dataset: str, *, revision: str | None = None) -> dict[str, CelebaSplit]:
    """train / valid / test of a local folder or a Hub dataset (see the module docstring)."""
    path = Path(dataset).expanduser()
    if path.exists():
        return _local_splits(path)
    return _hub_splits(dataset, revision)


def _local_splits(folder: Path) -> dict[str, CelebaSplit]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not folder.is_dir():
        raise DatasetError(
            f"{folder}: give a folder of parquet files named after their split"
            " (train-*.parquet, valid-*.parquet, test-*.parquet, or train/ valid/ test/)"
        )
    files = sorted(folder.rglob("*.parquet"))
    splits = {}
    for split in SPLITS:
        names = SPLIT_ALIASES.get(split, (split,))
        chosen = [
            f
            for f in files
            if any(
                part == name or part.startswith((f"{name}-", f"{name}_", f"{name}."))
                for part in f.relative_to(folder).parts
                for name in names
            )
        ]
        if not chosen:
            raise DatasetError(f"{folder}: no parquet files for the {split} split")
        try:
            tables = [pq.read_table(f, memory_map=True) for f in chosen]
            table = pa.concat_tables(tables, promote_options="default")
        except (pa.ArrowException, OSError) as error:
            raise DatasetError(f"{folder}: cannot read the {split} split: {error}") from None
        splits[split] = split_from_table(split, table, str(folder))
    return splits


def _hub_splits(dataset: str, revision: str | None) -> dict[str, CelebaSplit]:
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"{dataset} is not a local folder, and reading Hub datasets needs the `datasets`"
            " package (pip install datasets)"
        ) from None
    repo, _, config = dataset.partition(":")
    try:
        loaded = datasets.load_dataset(repo, config or None, revision=revision)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise DatasetError(f"cannot load {dataset}: {error}") from None
    splits = {}
    for split in SPLITS:
        name = next((n for n in SPLIT_ALIASES.get(split, (split,)) if n in loaded), None)
        if name is None:
            raise DatasetError(f"{dataset} has no {split} split (it has {sorted(loaded)})")
        table = loaded[name].with_format("arrow")[:]
        splits[split] = split_from_table(split, table, dataset)
    return splits


def dataset_revision(dataset: str, revision: str | None = None) -> dict:
    """What names the data exactly: a Hub dataset's revision resolved to its commit, or each
    local file's name and size (hashing gigabytes of parquet would cost more than it tells)."""
    path = Path(dataset).expanduser()
    if path.exists():
        files = sorted(path.rglob("*.parquet"))
        return {
            "dataset": str(path.resolve()),
            "files": {f.relative_to(path).as_posix(): f.stat().st_size for f in files},
        }
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from facecaption.models.hub import transport_errors

    repo, _, config = dataset.partition(":")
    try:
        info = HfApi().dataset_info(repo, revision=revision)
    except (HfHubHTTPError, *transport_errors(), OSError) as error:
        raise DatasetError(
            f"{dataset} is not a local folder, and the Hub did not give its revision"
            f" {revision or 'main'}: {type(error).__name__}: {error} (a gated dataset needs its"
            " terms accepted and `hf auth login` or HF_TOKEN)"
        ) from None
    return {"dataset": repo, "config": config or None, "revision": revision, "commit": info.sha}


def landmark_source(split: CelebaSplit, align: str) -> str:
    """Which alignment `align` means for this split (see the module docstring)."""
    if align not in ALIGN_CHOICES:
        raise ValueError(f"align must be one of {ALIGN_CHOICES}, not {align!r}")
    if align == "auto":
        return "landmarks" if split.landmarks is not None else "detector"
    if align == "landmarks" and split.landmarks is None:
        raise DatasetError(
            f"the {split.name} split has no landmark columns ({', '.join(LANDMARK_COLUMNS)});"
            " use --align detector or --align celeba-mean"
        )
    return align


def detect_landmarks(split: CelebaSplit, detector, cache: Path, progress=None) -> np.ndarray:  # noqa: ANN001
    """The detector's five points of each image's best face, NaN where it found none (or the
    image does not decode); computed once and kept in `cache` (an .npy)."""
    if cache.is_file():
        saved = np.load(cache)
        if saved.shape == (len(split), 5, 2):
            return saved
    points = np.full((len(split), 5, 2), np.nan)
    batch = getattr(detector, "batch_size", 8)
    for start in range(0, len(split), batch):
        indices = range(start, min(start + batch, len(split)))
        images = {i: decode_rgb(split.image_bytes(i)) for i in indices}
        decoded = [i for i in indices if images[i] is not None]
        for i, faces in zip(decoded, detector.detect([images[i] for i in decoded]), strict=True):
            best = next(
                (f for f in faces if f.landmarks is not None and len(f.landmarks) == 5), None
            )
            if best is not None:
                points[i] = best.landmarks
        if progress is not None:
            progress(len(indices))
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f".{cache.name}.partial.npy")
    np.save(partial, points)
    partial.replace(cache)
    return points


def aligned_crop(image: np.ndarray, landmarks: np.ndarray | None) -> np.ndarray:
    """The pipeline's crop of the face at `landmarks` (five points; None or NaN: CelebA's
    fixed aligned set)."""
    from facecaption.detect.align import align_face
    from facecaption.detect.backends.base import FaceDetection

    points = landmarks
    if points is None or not np.all(np.isfinite(points)):
        points = CELEBA_MEAN_LANDMARKS
    low, high = points.min(axis=0), points.max(axis=0)
    box = (float(low[0]), float(low[1]), float(high[0]) + 1, float(high[1]) + 1)
    return align_face(image, FaceDetection(box, 1.0, np.asarray(points, np.float64))).image


def describe(splits: dict[str, CelebaSplit]) -> str:
    return json.dumps({name: len(split) for name, split in splits.items()})
