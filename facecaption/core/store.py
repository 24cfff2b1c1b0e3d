"""Artifact storage through fsspec: per-shard paths, atomic publication, checksums.

A stage writes an artifact to a local temporary file and the store publishes it under its final
name only when the writer finished without error. On a local filesystem publication is a
rename in the same directory; on object stores (s3://, gs://, ...) it is one upload of the
finished file, which those stores make visible only when complete. Either way a reader never
sees a half-written artifact under its final name, and a killed writer leaves at most a
`.partial-*` file that the next run of the same stage removes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

PARTIAL_MARKER = ".partial-"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArtifactRef:
    """A published artifact: where it is and what it holds."""

    uri: str
    sha256: str
    bytes: int

    def as_json(self) -> dict[str, object]:
        return {"uri": self.uri, "sha256": self.sha256, "bytes": self.bytes}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    """Artifacts under one root URL: `{root}/shards/{shard_id}/{name}`."""

    def __init__(self, root: str, scratch_dir: Path | None = None) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.root = self.root.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)
        self._scratch_dir = scratch_dir

    def shard_path(self, shard_id: str, name: str) -> str:
        return f"{self.root}/shards/{shard_id}/{name}"

    def uri(self, path: str) -> str:
        """The path as a URL a user can paste (protocol included for remote stores)."""
        return path if self._local else self.fs.unstrip_protocol(path)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def open(self, path: str, mode: str = "rb") -> IO[bytes]:
        return self.fs.open(path, mode)

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """A parquet artifact (or some of its columns) as an Arrow table."""
        with self.open(path) as handle:
            return pq.read_table(handle, columns=columns)

    @contextmanager
    def publish(self, path: str) -> Iterator[Path]:
        """Yield a local temporary path; on success publish it at `path` atomically."""
        parent = path.rsplit("/", 1)[0]
        if self._local:
            os.makedirs(parent, exist_ok=True)
            scratch = Path(parent)
        else:
            scratch = self._scratch_dir or Path(tempfile.gettempdir())
            scratch.mkdir(parents=True, exist_ok=True)
        name = path.rsplit("/", 1)[1]
        tmp = scratch / f".{name}{PARTIAL_MARKER}{uuid.uuid4().hex}"
        try:
            yield tmp
            if self._local:
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            else:
                self.fs.put_file(str(tmp), path)
        finally:
            tmp.unlink(missing_ok=True)

    def publish_copy(self, source: str, path: str) -> None:
        """Copy an artifact to `path` (another folder or name), published atomically."""
        with self.open(source) as src, self.publish(path) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)

    def describe(self, path: str, local_file: Path) -> ArtifactRef:
        """Checksum a finished local file (inside `publish`) and describe it for the state DB."""
        return ArtifactRef(self.uri(path), sha256_file(local_file), local_file.stat().st_size)

    def remove_partials(self, shard_id: str) -> int:
        """Delete temporary files a killed writer left in a shard's folder."""
        folder = f"{self.root}/shards/{shard_id}"
        if not self.fs.exists(folder):
            return 0
        leftovers = [p for p in self.fs.ls(folder, detail=False) if PARTIAL_MARKER in p]
        for leftover in leftovers:
            self.fs.rm(leftover)
        return len(leftovers)

    def remove(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path)
