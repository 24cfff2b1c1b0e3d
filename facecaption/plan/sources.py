"""Source parquet files: identity, column resolution and bounded-memory row reads.

A source is identified by the sha256 of its bytes, so the same file planned from another path
is the same source, and an edited file is a new one. Rows are never loaded all at once:
planning reads only the footer, and a shard reads only the row groups that cover its range,
in batches, keeping just the columns it needs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from facecaption.core.errors import PermanentError
from facecaption.settings import SourceColumns

_HASH_CHUNK = 8 << 20
_BATCH_ROWS = 4096


class SourceError(PermanentError, ValueError):
    """A source file cannot be used as it is (unreadable, not parquet, required column missing)."""


@dataclass(frozen=True)
class SourceFile:
    uri: str
    name: str
    source_id: str
    size_bytes: int
    num_rows: int
    columns: dict[str, str | None]


def expand_source_uris(uris: list[str]) -> list[str]:
    """Files as given; a folder or glob becomes the parquet files in it, sorted."""
    expanded: list[str] = []
    for uri in uris:
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.isdir(path):
            found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
        elif any(ch in path for ch in "*?["):
            found = sorted(fs.glob(path))
        else:
            expanded.append(uri)
            continue
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


def inspect_source(uri: str, candidates: SourceColumns) -> SourceFile:
    """Identify a source file and resolve its columns, reading its bytes once in chunks."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        digest = hashlib.sha256()
        with fs.open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
            size = handle.tell()
        with fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
            schema = metadata.schema.to_arrow_schema()
    except FileNotFoundError as error:
        raise SourceError(f"{uri}: file not found") from error
    except (OSError, pa.ArrowException) as error:
        raise SourceError(f"{uri}: not a readable parquet file ({error})") from error
    return SourceFile(
        uri=uri,
        name=path.rsplit("/", 1)[-1],
        source_id=digest.hexdigest(),
        size_bytes=size,
        num_rows=metadata.num_rows,
        columns=resolve_columns(schema, candidates),
    )


def iter_rows(
    uri: str, columns: dict[str, str | None], row_start: int, row_end: int
) -> Iterator[pa.RecordBatch]:
    """Batches of rows `[row_start, row_end)` with columns renamed to their roles.

    Roles whose column is absent come back as null strings, so callers see one shape.
    """
    wanted = {role: name for role, name in columns.items() if name is not None}
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        groups, first_row = [], 0
        for index in range(parquet.metadata.num_row_groups):
            group_rows = parquet.metadata.row_group(index).num_rows
            if first_row < row_end and first_row + group_rows > row_start:
                if not groups:
                    offset = first_row
                groups.append(index)
            first_row += group_rows
        if not groups:
            return
        position = offset
        for batch in parquet.iter_batches(
            batch_size=_BATCH_ROWS, row_groups=groups, columns=list(wanted.values())
        ):
            lo = max(row_start - position, 0)
            hi = min(row_end - position, batch.num_rows)
            position += batch.num_rows
            if hi <= lo:
                continue
            batch = batch.slice(lo, hi - lo)
            arrays = {role: batch.column(name) for role, name in wanted.items()}
            for role in columns:
                if role not in arrays:
                    arrays[role] = pa.nulls(batch.num_rows, pa.string())
            yield pa.RecordBatch.from_pydict(arrays)
            if position >= row_end:
                break
