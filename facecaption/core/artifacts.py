"""The artifact contract: every file a stage or the release writes, by name, and the
pyarrow schema of each table. Stages, the release and the report import names and schemas
from here and nowhere else, so an artifact is described once.

Per shard, under `{store root}/shards/{shard_id}/` (see `core.store.ArtifactStore`):

    fetch.tar            webdataset: `{key}.{jpg|png|webp|gif|tif|bmp}` + `{key}.json`
    fetch.parquet        one row per source row with its typed status   (FETCH_SCHEMA)
    faces.tar            webdataset: aligned crop `{key}_{face}.{png|jpg}` + its row as json
    faces.parquet        one row per kept face                          (FACES_SCHEMA)
    attributes.parquet   one row per face, 40 probabilities + labels    (ATTRIBUTES_SCHEMA)
    captions.parquet     one row per kept face's caption                 (CAPTIONS_SCHEMA)
    release.parquet      this shard's rows of the release               (RELEASE_SCHEMA)
    train.tar            webdataset training samples (opt-in)

The release, under `{store root}/release/`: `manifest.json`, `data/*.parquet` (RELEASE_SCHEMA),
`train/{shard_id}.tar` and `report.html`.
"""

from __future__ import annotations

import pyarrow as pa

from facecaption.attribute.labels import CELEBA_ATTRIBUTES

# -- fetch ----------------------------------------------------------------------------------

FETCH_TAR = "fetch.tar"
FETCH_PARQUET = "fetch.parquet"
# Row statuses: images kept (bytes in fetch.tar, or the row names the row that has them) ...
FETCH_KEPT = frozenset({"ok", "duplicate"})
# ... and refusals by policy (what the site or a person asked for), which are not failures.
FETCH_POLICY = frozenset({"opted_out", "robots_disallowed", "blocked_address", "taken_down"})

FETCH_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("row", pa.int64()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("sample_id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("http_status", pa.int32()),
        ("attempts", pa.int32()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("duplicate_of", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("exif_orientation", pa.int32()),
    ]
)

# -- detect ---------------------------------------------------------------------------------

FACES_TAR = "faces.tar"
FACES_PARQUET = "faces.parquet"

FACES_SCHEMA = pa.schema(
    [
        ("face_id", pa.string()),
        ("key", pa.string()),
        ("face_idx", pa.int16()),
        ("x1", pa.int32()),
        ("y1", pa.int32()),
        ("x2", pa.int32()),
        ("y2", pa.int32()),
        ("landmarks", pa.list_(pa.float32())),
        ("score", pa.float32()),
        ("crop_width", pa.int32()),
        ("crop_height", pa.int32()),
        ("align_method", pa.string()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("exif_orientation", pa.int16()),
        ("detector_id", pa.string()),
    ]
)

# -- attribute ------------------------------------------------------------------------------

ATTRIBUTES_PARQUET = "attributes.parquet"

ATTRIBUTES_SCHEMA = pa.schema(
    [
        ("face_id", pa.string()),
        *[(f"p_{name}", pa.float32()) for name in CELEBA_ATTRIBUTES],
        ("valid_labels", pa.list_(pa.string())),
        ("dropped_labels", pa.list_(pa.string())),
        ("flagged_labels", pa.list_(pa.string())),
        ("label_count", pa.int16()),
        ("kept", pa.bool_()),
        ("model_id", pa.string()),
    ]
)

# -- caption --------------------------------------------------------------------------------

CAPTIONS_PARQUET = "captions.parquet"

CAPTIONS_SCHEMA = pa.schema(
    [
        ("face_id", pa.string()),
        ("raw_text", pa.string()),
        ("caption", pa.string()),
        ("caption_source", pa.string()),  # "llm" or "template"
        ("fidelity", pa.string()),
        ("missing", pa.list_(pa.string())),
        ("contradicted", pa.list_(pa.string())),
        ("model_id", pa.string()),
        ("prompt_version", pa.string()),
        ("word_count", pa.int32()),
        # why the LLM's last reply was not used, or "reply_truncated"; never a URL or detail
        ("rewrite_error", pa.string()),
    ]
)

# -- export (one shard's part of the release) -----------------------------------------------

RELEASE_PARQUET = "release.parquet"
TRAIN_TAR = "train.tar"

RELEASE_SCHEMA = pa.schema(
    [
        # FaceCaption-15M's columns
        ("url", pa.string()),
        ("box", pa.list_(pa.int32())),
        ("laion_caption", pa.list_(pa.string())),
        ("caption", pa.list_(pa.string())),
        # ours
        ("face_id", pa.string()),
        ("sample_id", pa.string()),
        ("shard_id", pa.string()),
        ("image_sha256", pa.string()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("score", pa.float32()),
        ("landmarks", pa.list_(pa.float32())),
        ("crop_width", pa.int32()),
        ("crop_height", pa.int32()),
        ("attributes", pa.list_(pa.string())),
        ("raw_text", pa.string()),
        ("caption_source", pa.string()),
        ("fidelity", pa.string()),
        ("detector_id", pa.string()),
        ("attribute_model_id", pa.string()),
        ("caption_model_id", pa.string()),
        ("fingerprint", pa.string()),
        ("license", pa.string()),
    ]
)

# -- the release ----------------------------------------------------------------------------

RELEASE_DIR = "release"
MANIFEST = "manifest.json"
REPORT_NAME = "report.html"
