"""Fetch: a shard's URLs become `fetch.tar` (original image bytes + per-sample json, webdataset)
and `fetch.parquet` (one row per source row, with a typed status).

Statuses: ok, duplicate (same bytes as an earlier row of the shard), and the failures
http_error, timeout, dns_error, connection_error, too_large, not_an_image, decode_error,
invalid_url. A bad URL is a row status, never a shard failure. Bytes are stored exactly as
downloaded (native resolution, no re-encode). Both files are in source row order; the parquet
is published last, after the tar.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from facecaption.downloader import Downloader
from facecaption.imaging import check_image
from facecaption.settings import FetchSettings, Settings
from facecaption.sources import iter_rows
from facecaption.stages import StageResult
from facecaption.state import Shard, ShardState
from facecaption.store import ArtifactStore
from facecaption.writers import WebDatasetWriter, write_parquet

TAR_NAME = "fetch.tar"
PARQUET_NAME = "fetch.parquet"

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
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("exif_orientation", pa.int32()),
    ]
)


@dataclass(frozen=True)
class SourceRow:
    row: int
    url: Any
    caption: str | None
    sample_id: str | None

    @property
    def key(self) -> str:
        return f"{self.row:09d}"


def shard_rows(shard: Shard) -> Iterator[SourceRow]:
    row = shard.row_start
    for batch in iter_rows(shard.source_uri, shard.columns, shard.row_start, shard.row_end):
        data = batch.to_pydict()
        for url, caption, sample_id in zip(
            data["url"], data["caption"], data["sample_id"], strict=True
        ):
            yield SourceRow(
                row,
                url,
                None if caption is None else str(caption),
                None if sample_id is None else str(sample_id),
            )
            row += 1


class FetchStage:
    name = "fetch"
    version = "1"
    artifact_names = (TAR_NAME, PARQUET_NAME)

    def fingerprint_inputs(
        self, shard: Shard, settings: Settings, state: ShardState
    ) -> dict[str, Any]:
        return {
            "source_id": shard.source_id,
            "rows": [shard.row_start, shard.row_end],
            "columns": shard.columns,
            "settings": settings.fetch.output_settings(),
        }

    def run(self, shard: Shard, settings: Settings, store: ArtifactStore) -> StageResult:
        tar_path = store.shard_path(shard.shard_id, TAR_NAME)
        parquet_path = store.shard_path(shard.shard_id, PARQUET_NAME)
        rows = list(shard_rows(shard))
        with store.publish(tar_path) as tmp_tar:
            records = asyncio.run(fetch_rows(rows, settings.fetch, tmp_tar))
            tar_ref = store.describe(tar_path, tmp_tar)
        with store.publish(parquet_path) as tmp_parquet:
            write_parquet(records, FETCH_SCHEMA, tmp_parquet)
            parquet_ref = store.describe(parquet_path, tmp_parquet)
        counts = Counter(record["status"] for record in records)
        return StageResult(
            counts={
                "rows": len(records),
                **dict(sorted(counts.items())),
                "bytes": sum(r["bytes"] or 0 for r in records if r["status"] == "ok"),
            },
            artifacts={TAR_NAME: tar_ref, PARQUET_NAME: parquet_ref},
        )


async def fetch_rows(rows: list[SourceRow], limits: FetchSettings, tar_path: Path) -> list[dict]:
    """Download and check every row; write kept images to a webdataset tar in row order.

    Bodies are appended to a local spool file as they arrive (memory stays bounded by the
    number of downloads in flight) and copied into the tar in row order at the end, so the
    tar is reproducible and, among rows with the same bytes, the first row keeps the image.
    Returns one record per row, in row order.
    """
    records: dict[int, dict[str, Any]] = {}
    spooled: dict[int, tuple[int, int, str]] = {}  # row -> (offset, length, extension)
    queue: asyncio.Queue[SourceRow] = asyncio.Queue()
    for row in rows:
        queue.put_nowait(row)
    loop = asyncio.get_running_loop()
    spool_path = tar_path.with_name(tar_path.name + ".spool")
    try:
        with (
            ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as decoder,
            open(spool_path, "w+b") as spool,
        ):

            async def worker() -> None:
                while not queue.empty():
                    row = queue.get_nowait()
                    download = await downloader.get(row.url)
                    record = _record(row, download.status, download.error)
                    record.update(http_status=download.http_status, attempts=download.attempts)
                    if download.status == "ok":
                        body = download.body or b""
                        check = await loop.run_in_executor(
                            decoder, check_image, body, limits.max_pixels
                        )
                        record.update(
                            status=check.status,
                            error=check.error,
                            bytes=len(body),
                            sha256=hashlib.sha256(body).hexdigest(),
                            width=check.width,
                            height=check.height,
                            format=check.format,
                            mode=check.mode,
                            exif_orientation=check.exif_orientation,
                        )
                        if check.status == "ok":
                            spooled[row.row] = (spool.tell(), len(body), check.extension or "bin")
                            spool.write(body)
                    records[row.row] = record

            async with Downloader(limits) as downloader:
                workers = min(limits.concurrency, max(1, len(rows)))
                await asyncio.gather(*(worker() for _ in range(workers)))
            _write_tar_in_row_order(rows, records, spooled, spool, tar_path)
    finally:
        spool_path.unlink(missing_ok=True)
    return [records[row.row] for row in rows]


def _write_tar_in_row_order(
    rows: list[SourceRow],
    records: dict[int, dict[str, Any]],
    spooled: dict[int, tuple[int, int, str]],
    spool: Any,
    tar_path: Path,
) -> None:
    first_key_by_sha: dict[str, str] = {}
    with WebDatasetWriter(tar_path) as tar:
        for row in rows:
            if row.row not in spooled:
                continue
            record = records[row.row]
            if record["sha256"] in first_key_by_sha:
                record.update(
                    status="duplicate", error=f"same bytes as {first_key_by_sha[record['sha256']]}"
                )
                continue
            first_key_by_sha[record["sha256"]] = row.key
            offset, length, extension = spooled[row.row]
            spool.seek(offset)
            tar.write_json(row.key, spool.read(length), extension, _meta(record))


def _record(row: SourceRow, status: str, error: str | None) -> dict[str, Any]:
    url = row.url if isinstance(row.url, str) else (None if row.url is None else str(row.url))
    return {
        **{name: None for name in FETCH_SCHEMA.names},
        "key": row.key,
        "row": row.row,
        "url": url,
        "caption": row.caption,
        "sample_id": row.sample_id,
        "status": status,
        "error": error,
    }


def _meta(record: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "key",
        "row",
        "url",
        "caption",
        "sample_id",
        "http_status",
        "sha256",
        "width",
        "height",
        "format",
        "mode",
        "exif_orientation",
    )
    return {name: record[name] for name in keep}
