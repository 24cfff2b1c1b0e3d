"""Source parquet files: identity, versions, column resolution and bounded-memory row reads.

A source is identified by the sha256 of its bytes, so the same file planned from another path
is the same source. Hashing reads the whole file, so it is done once per file version: what
the filesystem says about a file without reading it (size, mtime, ETag... see `stat_source`)
is recorded with the hash, and a file whose version is unchanged is the same source without
reading a byte. A file changed in place after it was planned is refused
(`SourceChangedError`), at planning and before a shard's rows are read: its shards' ids name
the old content. Rows are never loaded all at once: planning reads only the footer, and a
shard reads only the row groups that cover its range, in batches, keeping just the columns it
needs.

Source files are outside data. A file that cannot be used at all (not parquet, cut short, no
url column, a url column that cannot hold text or holds no value) is a `SourceError` when it
is planned, and the other files are still planned. Damage that only the data pages show (a
corrupt row group) is found when a shard reads them: `iter_rows` gives those rows back as
`UnreadableRows` with the reason, and the rows around them as usual. Text cells come back as
Python strings even when their bytes are not UTF-8 (see `cell_values`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from facecaption.core.errors import PermanentError
from facecaption.settings import SourceColumns
from facecaption.state.shards import SourceVersion

_HASH_CHUNK = 8 << 20
_BATCH_ROWS = 4096
_SURROGATES = re.compile("[\ud800-\udfff]")


# What filesystems report that changes when a file's content does (fsspec `info` keys): the
# modification time, and content checksums or version ids (S3, GCS, Azure, HTTP, HF Hub).
_MODIFIED_KEYS = ("LastModified", "Last-Modified", "last_modified", "updated", "mtime")
_ETAG_KEYS = (
    "ETag", "etag", "md5Hash", "crc32c", "Content-MD5", "Digest", "generation", "VersionId",
    "version_id", "blob_id",
)  # fmt: skip


class SourceError(PermanentError, ValueError):
    """A source file cannot be used as it is (unreadable, not parquet, required column missing)."""


class SourceChangedError(SourceError):
    """A planned source file changed (or vanished) after planning: its shards' ids name rows
    it no longer holds."""


@dataclass(frozen=True)
class SourceFile:
    uri: str
    name: str
    source_id: str
    size_bytes: int
    num_rows: int
    columns: dict[str, str | None]


@dataclass(frozen=True)
class UnreadableRows:
    """Rows `[row_start, row_end)` of a source that could not be read, and why."""

    row_start: int
    row_end: int
    error: str


def expand_source_uris(uris: list[str]) -> list[str]:
    """Files as given; a folder or glob becomes the parquet files in it, sorted. Asks the
    filesystem what a path is (HTTP: a HEAD), never lists a file (HTTP: a whole GET)."""
    expanded: list[str] = []
    for uri in uris:
        try:
            fs, path = fsspec.core.url_to_fs(uri)
            try:
                kind = fs.info(path).get("type")
            except (FileNotFoundError, OSError):
                kind = None  # a glob, or a file the planner reports as not found
            if kind == "directory":
                found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
            elif kind is None and any(ch in path for ch in "*?["):
                found = sorted(fs.glob(path))
            else:
                expanded.append(uri)
                continue
        except (OSError, ValueError) as error:
            raise SourceError(f"{uri}: cannot be listed ({error})") from error
        if not found:
            raise SourceError(f"{uri}: no parquet files found")
        expanded.extend(fs.unstrip_protocol(p) if "://" in uri else p for p in found)
    return expanded


def resolve_columns(schema: pa.Schema, candidates: SourceColumns) -> dict[str, str | None]:
    """Map our column roles to the file's names; the url column is required."""
    names = set(schema.names)
    resolved = {
        role: next((name for name in options if name in names), None)
        for role, options in candidates.model_dump().items()
    }
    if resolved["url"] is None:
        raise SourceError(
            f"no url column: looked for {candidates.url}, the file has {sorted(names)};"
            " set FACECAPTION_COLUMNS__URL"
        )
    return resolved


def _is_text(data_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    return (
        pa.types.is_string(data_type)
        or pa.types.is_large_string(data_type)
        or pa.types.is_string_view(data_type)
    )


def _check_urls(metadata: pq.FileMetaData, schema: pa.Schema, url: str) -> None:
    """Refuse a file whose rows cannot give a URL: a url column that cannot hold text, or
    whose footer shows it null in every row (an empty file is fine: it has no shards)."""
    if metadata.num_rows < 0 or any(
        metadata.row_group(i).num_rows < 0 for i in range(metadata.num_row_groups)
    ):
        raise SourceError("the footer gives a negative number of rows")
    if metadata.num_rows == 0:
        return
    url_type = schema.field(url).type
    if pa.types.is_null(url_type):
        raise SourceError(f"the url column {url!r} is null in all {metadata.num_rows} rows")
    if not _is_text(url_type):
        raise SourceError(f"the url column {url!r} holds {url_type}, not text (string)")
    nulls = 0
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        chunk = next(
            (group.column(c) for c in range(group.num_columns)
             if group.column(c).path_in_schema == url),
            None,
        )  # fmt: skip
        statistics = chunk.statistics if chunk is not None else None
        if statistics is None or not statistics.has_null_count:
            return  # unknown: the rows will say
        nulls += statistics.null_count
    if nulls >= metadata.num_rows:
        raise SourceError(f"the url column {url!r} is null in all {metadata.num_rows} rows")


def stat_source(uri: str) -> SourceVersion:
    """What the filesystem says about a file without reading it. A local file's version is
    its size, mtime, ctime and inode (ctime catches an edit whose mtime was put back);
    an object store's is its size, modification time and ETag/checksum/generation."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if isinstance(fs, LocalFileSystem):
            stat = os.stat(path)
            if not os.path.isfile(path):
                raise SourceError(f"{uri}: not a file")
            modified = f"mtime_ns={stat.st_mtime_ns};ctime_ns={stat.st_ctime_ns}"
            return SourceVersion(stat.st_size, modified, f"inode={stat.st_ino}")
        info = fs.info(path)
    except FileNotFoundError as error:
        raise SourceError(f"{uri}: file not found") from error
    except OSError as error:
        raise SourceError(f"{uri}: cannot be read ({error})") from error
    size = info.get("size")
    return SourceVersion(
        int(size) if isinstance(size, int | float) else None,
        _version_fields(info, _MODIFIED_KEYS),
        _version_fields(info, _ETAG_KEYS),
    )


def _version_fields(info: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    found = [f"{key}={info[key]}" for key in keys if info.get(key) not in (None, "")]
    return ";".join(found) or None


def content_sha256(uri: str, version: SourceVersion | None = None) -> str:
    """The sha256 of a file's bytes, read once in chunks; memoised per process for a
    comparable `version` (the shards of one file check it once)."""
    if version is not None and version.comparable:
        return _content_sha256_of_version(uri, version)
    return _content_sha256(uri)


@functools.lru_cache(maxsize=256)
def _content_sha256_of_version(uri: str, version: SourceVersion) -> str:
    return _content_sha256(uri)


def _content_sha256(uri: str) -> str:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        digest = hashlib.sha256()
        with fs.open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    except FileNotFoundError as error:
        raise SourceError(f"{uri}: file not found") from error
    except OSError as error:
        raise SourceError(f"{uri}: cannot be read ({error})") from error
    return digest.hexdigest()


def verify_source(uri: str, source_id: str, planned: SourceVersion | None) -> None:
    """Refuse (SourceChangedError) a file that no longer holds the content it was planned
    with: a different size says so at once; an unchanged version says it has not changed;
    anything else is settled by hashing it (a file touched but not edited passes)."""
    try:
        now = stat_source(uri)
    except SourceError as error:
        raise SourceChangedError(
            f"{error}: source {source_id[:12]} was planned from it and its shards cannot be"
            " read; put the file back, or plan its new location"
        ) from error
    if planned is not None and now.same_as(planned):
        return
    size_changed = planned is not None and None not in (planned.size, now.size)
    if (size_changed and planned.size != now.size) or content_sha256(uri, now) != source_id:
        raise SourceChangedError(changed_message(uri, source_id))


def changed_message(uri: str, source_id: str) -> str:
    return (
        f"{uri} changed after it was planned as source {source_id[:12]}: its shards' ids name"
        " rows the file no longer holds, so they are not read. Put the original file back,"
        " or write the new content under a new file name and plan that"
    )


def inspect_source(
    uri: str, candidates: SourceColumns, version: SourceVersion | None = None
) -> SourceFile:
    """Identify a source file and resolve its columns, reading its bytes once in chunks."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        source_id = content_sha256(uri, version)
        size = version.size if version and version.size is not None else fs.size(path)
        with fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
            schema = metadata.schema.to_arrow_schema()
    except FileNotFoundError as error:
        raise SourceError(f"{uri}: file not found") from error
    except (OSError, pa.ArrowException) as error:
        raise SourceError(f"{uri}: not a readable parquet file ({_one_line(error)})") from error
    try:
        columns = resolve_columns(schema, candidates)
        _check_urls(metadata, schema, columns["url"] or "")
    except SourceError as error:
        raise SourceError(f"{uri}: {error}") from error
    return SourceFile(
        uri=uri,
        name=path.rsplit("/", 1)[-1],
        source_id=source_id,
        size_bytes=size,
        num_rows=metadata.num_rows,
        columns=columns,
    )


def iter_rows(
    uri: str, columns: dict[str, str | None], row_start: int, row_end: int
) -> Iterator[pa.RecordBatch | UnreadableRows]:
    """Batches of rows `[row_start, row_end)` with columns renamed to their roles, in order;
    rows whose row group cannot be read (or holds fewer rows than the footer says) come as
    `UnreadableRows` in their place.

    Roles whose column is absent come back as null strings, so callers see one shape.
    """
    wanted = {role: name for role, name in columns.items() if name is not None}
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        group_start = 0
        for index in range(parquet.metadata.num_row_groups):
            group_end = group_start + parquet.metadata.row_group(index).num_rows
            lo, hi = max(row_start, group_start), min(row_end, group_end)
            if lo < hi:
                yield from _read_group(parquet, index, group_start, lo, hi, wanted, columns)
            group_start = group_end
            if group_start >= row_end:
                break


def _read_group(
    parquet: pq.ParquetFile,
    index: int,
    group_start: int,
    lo: int,
    hi: int,
    wanted: dict[str, str],
    columns: dict[str, str | None],
) -> Iterator[pa.RecordBatch | UnreadableRows]:
    """Rows `[lo, hi)` of row group `index` (which starts at `group_start`)."""
    position = group_start
    try:
        for batch in parquet.iter_batches(
            batch_size=_BATCH_ROWS, row_groups=[index], columns=list(wanted.values())
        ):
            first, last = max(lo, position), min(hi, position + batch.num_rows)
            position += batch.num_rows
            if first < last:
                part = batch.slice(first - (position - batch.num_rows), last - first)
                arrays = {role: part.column(name) for role, name in wanted.items()}
                for role in columns:
                    if role not in arrays:
                        arrays[role] = pa.nulls(part.num_rows, pa.string())
                yield pa.RecordBatch.from_pydict(arrays)
            if position >= hi:
                return
    except (OSError, pa.ArrowException) as error:
        if not _is_data_error(error):
            raise
        reason = f"row group {index} cannot be read: {_one_line(error)}"
    else:
        reason = f"row group {index} holds fewer rows than the footer says"
    yield UnreadableRows(max(lo, position), hi, reason)


def _is_data_error(error: BaseException) -> bool:
    """Whether a read failed on the file's bytes (a damaged page, bad framing), which reading
    again cannot change, rather than on the way to them (network, permissions), which is
    raised. Arrow reports damaged data as a plain OSError or an ArrowException."""
    return type(error) is OSError or isinstance(error, pa.ArrowException)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def cell_values(array: pa.Array | pa.ChunkedArray) -> list[object]:
    """The Python values of a column. Text cells are decoded as UTF-8 with invalid bytes kept
    as lone surrogates (`surrogateescape`), so one bad cell never stops a batch: who uses the
    text decides (a url with them is invalid, a caption replaces them)."""
    if isinstance(array, pa.ChunkedArray):
        return [value for chunk in array.chunks for value in cell_values(chunk)]
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if pa.types.is_string(array.type):
        raw = array.view(pa.binary()).to_pylist()
    elif pa.types.is_large_string(array.type):
        raw = array.view(pa.large_binary()).to_pylist()
    elif pa.types.is_string_view(array.type):
        raw = array.cast(pa.binary_view()).to_pylist()
    else:
        return array.to_pylist()
    return [None if cell is None else cell.decode("utf-8", "surrogateescape") for cell in raw]


def cell_text(value: object) -> str | None:
    """A caption or sample id cell as text that can be stored anywhere: None for null (and a
    float NaN), bytes decoded as UTF-8, other values written out; invalid UTF-8 (lone
    surrogates) becomes U+FFFD."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return _SURROGATES.sub("\ufffd", value if isinstance(value, str) else str(value))
