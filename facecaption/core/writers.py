"""Output formats for per-shard artifacts: webdataset tar files and typed parquet tables.

The tar writer knows nothing of HTTP or images: it stores named byte blobs per sample key,
with fixed metadata (mtime 0, root owner, mode 0644) so that the same samples in the same order
give the same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


class WebDatasetWriter:
    """`{key}.{ext}` members grouped by sample key; write(key, files) / close()."""

    def __init__(self, path: Path) -> None:
        self._tar = tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.samples = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"webdataset keys may not contain '.' or '/': {key!r}")
        for ext, payload in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            info.mtime = 0
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(payload))
        self.samples += 1

    def write_json(self, key: str, blob: bytes, ext: str, meta: dict[str, Any]) -> None:
        self.write(key, {ext: blob, "json": json.dumps(meta, sort_keys=True).encode()})

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> WebDatasetWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def iter_webdataset(fileobj: Any) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of each file in a webdataset tar, read as a stream."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            extracted = tar.extractfile(member)
            assert extracted is not None
            yield key, ext, extracted.read()


def read_webdataset(fileobj: Any) -> dict[str, dict[str, bytes]]:
    """All samples of a (small) webdataset tar, `{key: {ext: bytes}}`; for tests and tools."""
    samples: dict[str, dict[str, bytes]] = {}
    for key, ext, payload in iter_webdataset(fileobj):
        samples.setdefault(key, {})[ext] = payload
    return samples


def write_parquet(rows: Sequence[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pylist(list(rows), schema=schema)
    pq.write_table(table, path, compression="zstd")
