"""Artifact storage through fsspec: per-shard paths, atomic publication, checksums.

A stage writes an artifact to a local temporary file and the store publishes it under its final
name only when the writer finished without error. On a local filesystem publication is a
rename in the same directory; on object stores (s3://, gs://, ...) it is one upload of the
finished file, which those stores make visible only when complete. Either way a reader never
sees a half-written artifact under its final name.

A store bound to an owner (`owned_by`: a stage attempt, a release publish) names its
temporary files `.{name}.partial-{owner}-{number}-{random}` and publishes each one inside the
owner's fence, which confirms that the owner still holds the work right before the rename.
A killed writer leaves at most such a file; the owner's next attempt removes the ones of its
own earlier attempts (`remove_partials`), and nobody removes another owner's.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

PARTIAL_MARKER = ".partial-"
_CHUNK = 1 << 20
# `.{name}.partial-{owner}-{number}-{uuid hex}` (and files named after it, e.g. a `.spool`)
_OWNED_PARTIAL = re.compile(r"\.partial-(?P<owner>[a-z_]+)-(?P<number>\d+)-[0-9a-f]{32}")
# written before temporary names carried their owner: `.{name}.partial-{uuid hex}`
_UNOWNED_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-[0-9a-f]{32}")

Fence = Callable[[], AbstractContextManager[object]]


class ArtifactChecksumError(ValueError):
    """An artifact's bytes are not the ones recorded for it (changed, truncated, replaced)."""


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
        self.owner: str | None = None  # "{owner}-{number}", e.g. "detect-3", "release-12"
        self._fence: Fence = nullcontext

    def owned_by(self, owner: str, number: int, fence: Fence) -> ArtifactStore:
        """This store for one owner: temporary files carry `{owner}-{number}`, and every
        publication runs inside `fence()`, which raises when the owner lost the work."""
        if not re.fullmatch(r"[a-z_]+", owner):
            raise ValueError(f"owner names are lower-case words, got {owner!r}")
        bound = copy.copy(self)
        bound.owner, bound._fence = f"{owner}-{number}", fence
        return bound

    def shard_folder(self, shard_id: str) -> str:
        return f"{self.root}/shards/{shard_id}"

    def shard_path(self, shard_id: str, name: str) -> str:
        return f"{self.shard_folder(shard_id)}/{name}"

    def uri(self, path: str) -> str:
        """The path as a URL a user can paste (protocol included for remote stores)."""
        return path if self._local else self.fs.unstrip_protocol(path)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def open(self, path: str, mode: str = "rb") -> IO[bytes]:
        return self.fs.open(path, mode)

    def size(self, path: str) -> int | None:
        """The artifact's size in bytes, None when there is none."""
        try:
            return int(self.fs.size(path))
        except FileNotFoundError:
            return None

    def read_table(
        self, path: str, columns: list[str] | None = None, *, sha256: str | None = None
    ) -> pa.Table:
        """A parquet artifact (or some of its columns) as an Arrow table. With `sha256`, the
        file is read whole and checked first (ArtifactChecksumError when it differs)."""
        if sha256 is None:
            with self.open(path) as handle:
                return pq.read_table(handle, columns=columns)
        with self.open(path) as handle:
            data = handle.read()
        found = hashlib.sha256(data).hexdigest()
        if found != sha256:
            raise ArtifactChecksumError(
                f"{path}: {len(data)} bytes with sha256 {found[:12]}, recorded {sha256[:12]}"
            )
        return pq.read_table(pa.BufferReader(data), columns=columns)

    @contextmanager
    def open_checked(self, path: str, sha256: str) -> Iterator[IO[bytes]]:
        """Open an artifact for streaming; when the block ends, the bytes read (and the rest
        of the file) must have `sha256` (ArtifactChecksumError otherwise)."""
        with self.open(path) as handle:
            reader = _HashingReader(handle)
            yield reader  # type: ignore[misc]
            while reader.read(_CHUNK):
                pass
        found = reader.digest.hexdigest()
        if found != sha256:
            raise ArtifactChecksumError(
                f"{path}: {reader.count} bytes with sha256 {found[:12]}, recorded {sha256[:12]}"
            )

    @contextmanager
    def publish(self, path: str) -> Iterator[Path]:
        """Yield a local temporary path; on success publish it at `path` atomically, inside
        the owner's fence."""
        parent = path.rsplit("/", 1)[0]
        if self._local:
            os.makedirs(parent, exist_ok=True)
            scratch = Path(parent)
        else:
            scratch = self._scratch_dir or Path(tempfile.gettempdir())
            scratch.mkdir(parents=True, exist_ok=True)
        name = path.rsplit("/", 1)[1]
        owner = f"{self.owner}-" if self.owner else ""
        tmp = scratch / f".{name}{PARTIAL_MARKER}{owner}{uuid.uuid4().hex}"
        try:
            yield tmp
            if self._local:
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                with self._fence():
                    os.replace(tmp, path)
            else:
                with self._fence():
                    self.fs.put_file(str(tmp), path)
        finally:
            tmp.unlink(missing_ok=True)

    def publish_copy(self, source: str, path: str, sha256: str | None = None) -> None:
        """Copy an artifact to `path` (another folder or name), published atomically; with
        `sha256`, only if the source has those bytes (ArtifactChecksumError otherwise)."""
        with self.publish(path) as tmp:
            opened = self.open_checked(source, sha256) if sha256 else self.open(source)
            with opened as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)

    def describe(self, path: str, local_file: Path) -> ArtifactRef:
        """Checksum a finished local file (inside `publish`) and describe it for the state DB."""
        return ArtifactRef(self.uri(path), sha256_file(local_file), local_file.stat().st_size)

    def remove_partials(
        self, folder: str, owner: str, number: int, names: Collection[str] | None = ()
    ) -> int:
        """Delete the temporary files that `owner`'s attempts before `number` left in `folder`
        (and its subfolders): a killed writer's leftovers. Other owners' files are left alone,
        and so are those of `number` itself. Temporary files from before names carried their
        owner are the owner's when named after one of `names` (None: any name)."""
        if not self.fs.exists(folder):
            return 0
        removed = 0
        for path in self.fs.find(folder):
            name = path.rsplit("/", 1)[-1]
            if PARTIAL_MARKER not in name:
                continue
            owned = _OWNED_PARTIAL.search(name)
            if owned:
                stale = owned["owner"] == owner and int(owned["number"]) < number
            else:
                unowned = _UNOWNED_PARTIAL.match(name)
                stale = bool(unowned) and (names is None or unowned["name"] in names)
            if stale:
                self.fs.rm(path)
                removed += 1
        return removed

    def remove(self, path: str) -> None:
        """Delete an artifact, inside the owner's fence (a fenced-out owner deletes nothing)."""
        with self._fence():
            if self.fs.exists(path):
                self.fs.rm(path)


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes what passes through it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self.digest.update(chunk)
        self.count += len(chunk)
        return chunk

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)
