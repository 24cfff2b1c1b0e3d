"""Fetch: a shard's URLs become `fetch.tar` (original image bytes + per-sample json, webdataset)
and `fetch.parquet` (one row per source row, with a typed status).

Statuses: `ok`; `duplicate` (the same bytes are kept by the row `duplicate_of`, in this shard or
another: the owner, the smallest (shard id, key) holding them, see `state.dedup`); the policy
outcomes `opted_out`, `robots_disallowed`, `blocked_address`,
`taken_down` (the URL or the image's sha256 is under a takedown request); and
the failures `http_error`, `timeout`, `dns_error`, `connection_error`, `robots_unavailable`,
`too_large`, `not_an_image`, `unsupported_format`, `decode_error`, `invalid_url`,
`invalid_redirect`, `invalid_response`, `source_error` (the source file's row group could not
be read) and `gave_up` (a transient failure in every run its budget allowed, see `retries`).
A bad URL, server or source cell is a row status, never a shard failure: every url cell is
checked (`parse_url`) before anything else sees it, the takedown lookup in Postgres
included; one with credentials is refused, and rows store urls and errors with credentials
masked. Bytes are stored exactly as downloaded (native resolution, no re-encode). Both
files are in source row order; the parquet is published last.

A forced re-run over outputs made with the same settings keeps every row whose status is final
(and its bytes) and fetches again only the transient failures (see `retry_later`) whose pause
between runs has passed (a forced run does not wait), until their budget of runs is spent
(`retries`: which rows wait, and until when, is kept in the state DB). The same
holds for a re-run because the owner of one of its images changed (the fingerprint covers the
shard's `dedup_epoch`): rows are marked again, and a duplicate row that now owns bytes this
shard does not have is fetched again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from yarl import URL

from facecaption.core.artifacts import (
    FETCH_KEPT,
    FETCH_PARQUET,
    FETCH_POLICY,
    FETCH_SCHEMA,
    FETCH_TAR,
)
from facecaption.core.imaging import EXTENSIONS, check_image
from facecaption.core.redaction import redact_text, redact_userinfo
from facecaption.core.retry_budget import next_due
from facecaption.core.stage import DedupIndex, StageContext, StageInputs, StageResult
from facecaption.core.writers import WebDatasetWriter, iter_webdataset, write_parquet
from facecaption.fetch.retries import row_budget, settle
from facecaption.fetch.web.downloader import Downloader, retry_later
from facecaption.fetch.web.throttle import HostRates, host_key
from facecaption.fetch.web.urls import UnusableURL, parse_url, quote
from facecaption.plan.sources import (
    UnreadableRows,
    cell_text,
    cell_values,
    iter_rows,
    verify_source,
)
from facecaption.settings import FetchSettings, Settings
from facecaption.state import Shard
from facecaption.state.takedowns import TakedownIndex

WORKERS_PER_CONNECTION = 4
# A row's error is for people; a hostile server or cell decides how long it would be.
ERROR_CHARS = 1000


@dataclass(frozen=True)
class SourceRow:
    row: int
    url: object  # the cell as read: text, or whatever else the source holds
    caption: str | None
    sample_id: str | None
    unreadable: str | None = None  # why the source could not give this row

    @property
    def key(self) -> str:
        return f"{self.row:09d}"


def shard_rows(shard: Shard) -> Iterator[SourceRow]:
    """The shard's source rows; SourceChangedError if the file changed since planning."""
    verify_source(shard.source_uri, shard.source_id, shard.source_version)
    row = shard.row_start
    for part in iter_rows(shard.source_uri, shard.columns, shard.row_start, shard.row_end):
        if isinstance(part, UnreadableRows):
            for number in range(part.row_start, part.row_end):
                yield SourceRow(number, None, None, None, unreadable=part.error)
            row = part.row_end
            continue
        cells = zip(
            cell_values(part.column("url")),
            cell_values(part.column("caption")),
            cell_values(part.column("sample_id")),
            strict=True,
        )
        for url, caption, sample_id in cells:
            yield SourceRow(row, url, cell_text(caption), cell_text(sample_id))
            row += 1


class Spool:
    """Image bytes by row in one local append-only file, so memory holds offsets only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] = open(path, "w+b")  # noqa: SIM115 (closed in close())
        self._where: dict[int, tuple[int, int]] = {}

    def add(self, row: int, body: bytes) -> None:
        self._file.seek(0, os.SEEK_END)
        self._where[row] = (self._file.tell(), len(body))
        self._file.write(body)

    def share(self, row: int, with_row: int) -> None:
        """`row` has the same bytes as `with_row` (stored once)."""
        self._where[row] = self._where[with_row]

    def __contains__(self, row: int) -> bool:
        return row in self._where

    def read(self, row: int) -> bytes:
        offset, length = self._where[row]
        self._file.seek(offset)
        return self._file.read(length)

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class FetchStage:
    name = "fetch"
    version = "2"
    artifact_names = (FETCH_TAR, FETCH_PARQUET)
    cross_shard_inputs = ("dedup",)

    def settings_inputs(self, settings: Settings) -> dict[str, Any]:
        return {"settings": settings.fetch.output_settings()}

    def shard_inputs(self, shard: Shard, settings: Settings, inputs: StageInputs) -> dict[str, Any]:
        own: dict[str, Any] = {
            "source_id": shard.source_id,
            "rows": [shard.row_start, shard.row_end],
            "columns": shard.columns,
        }
        epoch = inputs.dedup_epoch(shard.shard_id)
        if epoch:  # the owner of one of its images changed since it was first fetched
            own["dedup"] = epoch
        return own

    def run(self, context: StageContext) -> StageResult:
        shard, store, limits = context.shard, context.store, context.settings.fetch
        tar_path = store.shard_path(shard.shard_id, FETCH_TAR)
        parquet_path = store.shard_path(shard.shard_id, FETCH_PARQUET)
        rows = list(shard_rows(shard))
        urls, refused = check_rows(rows, limits)
        now = datetime.now(UTC)
        # rows that failed transiently before: runs used, and when each is due again
        ledger = context.earlier_retries()
        pausing = {int(key) for key in row_budget(limits).pausing(ledger, now, context.forced)}
        with store.publish(tar_path) as tmp_tar:
            with Spool(tmp_tar.with_name(tmp_tar.name + ".spool")) as spool:
                reused = self._keep_final_rows(context, spool, pausing) if context.previous else {}
                taken_down = skip_taken_down_urls(rows, urls, context.takedowns)
                kept = reused | refused | taken_down
                to_fetch = [(row, urls[row.row]) for row in rows if row.row not in kept]
                # progress: rows answered so far ("done") and their statuses
                answered = Counter(record["status"] for record in kept.values())
                answered["done"] = len(kept)

                def report(record: dict[str, Any]) -> None:
                    answered["done"] += 1
                    answered[record["status"]] += 1
                    context.progress({"rows": len(rows), **answered})

                hosts = HostRates(learned_rates(context, to_fetch))
                fetched = asyncio.run(fetch_rows(to_fetch, limits, spool, report, hosts))
                if context.host_rates is not None:  # the next shard starts from these
                    context.host_rates.save(hosts.learned)
                by_row = {**kept, **fetched}
                records = [by_row[row.row] for row in rows]
                waiting = settle(records, set(fetched), ledger, limits, now)
                drop_taken_down_images(records, context.takedowns)
                share_bytes(records, spool)
                mark_duplicates(records, shard.shard_id, context.dedup)
                write_tar(records, spool, tmp_tar)
            tar_ref = store.describe(tar_path, tmp_tar)
        with store.publish(parquet_path) as tmp_parquet:
            write_parquet(records, FETCH_SCHEMA, tmp_parquet)
            parquet_ref = store.describe(parquet_path, tmp_parquet)
        context.keep_retries(waiting)
        if context.takedowns is not None:  # takedowns are matched against this index
            images = kept_images(records)
            context.takedowns.index_fetched(shard.shard_id, parquet_ref.sha256, images)
        statuses = Counter(record["status"] for record in records)
        return StageResult(
            counts={
                "rows": len(records),
                **dict(sorted(statuses.items())),
                "bytes": sum(r["bytes"] or 0 for r in records if r["status"] == "ok"),
                "fetched": len(to_fetch),
                "reused": len(reused.keys() - refused.keys() - taken_down.keys()),
                # rows a later run will try again (the runner re-runs a stage that has some)
                "retryable": sum(retry_later(r["status"], r["http_status"]) for r in records),
                **hosts.counts(),  # requests, 429/503s and pauses, over all hosts
            },
            artifacts={FETCH_TAR: tar_ref, FETCH_PARQUET: parquet_ref},
            warnings=error_rate_warnings(statuses, limits.warn_error_rate),
            retry_at=next_due(waiting),
            stats={"hosts": hosts.busiest(limits.report_hosts)},
        )

    @staticmethod
    def _keep_final_rows(
        context: StageContext, spool: Spool, pausing: set[int]
    ) -> dict[int, dict[str, Any]]:
        """Rows of the previous outputs whose status is final, their bytes into the spool, and
        the `pausing` ones (failed transiently, not due yet) as they are."""
        store, shard_id = context.store, context.shard.shard_id
        previous = store.read_table(store.shard_path(shard_id, FETCH_PARQUET)).to_pylist()
        kept = {
            record["row"]: record
            for record in previous
            if not retry_later(record["status"], record["http_status"]) or record["row"] in pausing
        }
        with store.open(store.shard_path(shard_id, FETCH_TAR)) as handle:
            for key, ext, payload in iter_webdataset(handle):
                if ext != "json" and int(key) in kept:
                    spool.add(int(key), payload)
        # an ok row whose bytes are missing from the tar cannot be kept as ok
        kept = {row: r for row, r in kept.items() if r["status"] != "ok" or row in spool}
        # A duplicate whose bytes no row here has, and which the index now names as the
        # owner (its owner stopped holding them), must get its bytes again.
        here = {r["sha256"] for row, r in kept.items() if r["status"] == "ok"}
        elsewhere = {
            row: r
            for row, r in kept.items()
            if r["status"] == "duplicate" and r["sha256"] not in here
        }
        owners = context.dedup.owners(sorted({r["sha256"] for r in elsewhere.values()}))
        for row, record in elsewhere.items():
            owner = owners.get(record["sha256"])
            if owner is None or owner == (shard_id, record["key"]):
                del kept[row]
        return kept


def check_rows(
    rows: list[SourceRow], limits: FetchSettings
) -> tuple[dict[int, URL], dict[int, dict[str, Any]]]:
    """The URL of each row that has one we may request, and a record for every other row:
    `source_error` when the source could not give the row, `invalid_url` when its cell is not
    such a URL. Nothing else (Postgres, DNS, HTTP) ever sees a url cell these refuse."""
    urls: dict[int, URL] = {}
    refused: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row.unreadable is not None:
            refused[row.row] = _record(row, "source_error", row.unreadable) | {"attempts": 0}
            continue
        try:
            urls[row.row] = parse_url(row.url, limits.allowed_schemes)
        except UnusableURL as error:
            refused[row.row] = _record(row, "invalid_url", str(error)) | {"attempts": 0}
    return urls, refused


async def fetch_rows(
    rows: list[tuple[SourceRow, URL]],
    limits: FetchSettings,
    spool: Spool,
    on_record: Callable[[dict[str, Any]], None] = lambda record: None,
    hosts: HostRates | None = None,
) -> dict[int, dict[str, Any]]:
    """Download and check `rows`, spooling the bytes of images we keep; records by row, each
    also passed to `on_record` as soon as it is final. `hosts` holds the rates to start
    from, and gets the per-host figures and learned rates at the end.

    Memory is bounded by settings, not by the number of rows: at most `concurrency` bodies
    downloading and `concurrency` waiting for their check (each under `max_bytes`); bodies go
    to the spool as soon as they are checked.
    """
    records: dict[int, dict[str, Any]] = {}
    hosts = hosts if hosts is not None else HostRates()
    loop = asyncio.get_running_loop()
    checking = asyncio.Semaphore(limits.concurrency)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as decoder:

        async def worker() -> None:
            while (taken := await queue.take()) is not None:
                _host, (row, url) = taken
                download = await downloader.get(url, reserved=True)
                record = _record(row, download.status, download.error)
                record.update(http_status=download.http_status, attempts=download.attempts)
                if download.status == "ok":
                    body = download.body or b""
                    # Pillow releases the GIL while decoding: checks run beside the loop,
                    # and at most `concurrency` bodies wait for theirs.
                    async with checking:
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
                        spool.add(row.row, body)
                records[row.row] = record
                on_record(record)

        async with Downloader(limits, hosts.start) as downloader:
            # Rows are handed out by host, only from hosts that may take a request now (see
            # `throttle`): a paused or slow host holds no worker. More workers than
            # connections: a worker backing off before a retry holds no connection.
            queue = downloader.queue([(url, (row, url)) for row, url in rows])
            workers = min(limits.concurrency * WORKERS_PER_CONNECTION, max(1, len(rows)))
            await asyncio.gather(*(worker() for _ in range(workers)))
            hosts.done(downloader.hosts)
    return records


def learned_rates(context: StageContext, rows: list[tuple[SourceRow, URL]]) -> dict[str, float]:
    """What earlier shards learned of the rates of the hosts in `rows`."""
    if context.host_rates is None:
        return {}
    return context.host_rates.load(host_key(url.host) for _, url in rows)


def skip_taken_down_urls(
    rows: list[SourceRow], urls: dict[int, URL], takedowns: TakedownIndex | None
) -> dict[int, dict[str, Any]]:
    """Records (status `taken_down`, nothing downloaded) for rows whose URL is under a
    takedown. Only rows with a checked URL (`urls`) are looked up, as their source text."""
    if takedowns is None:
        return {}
    texts = {row.row: str(row.url).strip() for row in rows if row.row in urls}
    blocked = takedowns.blocked("url", list(texts.values()))
    return {
        row.row: _record(row, "taken_down", "URL under a takedown request")
        for row in rows
        if row.row in texts and texts[row.row] in blocked
    }


def drop_taken_down_images(records: list[dict[str, Any]], takedowns: TakedownIndex | None) -> None:
    """Rows holding bytes under a takedown (downloaded now, or kept from an earlier run)
    become `taken_down`, and the bytes are not stored."""
    if takedowns is None:
        return
    held = [r for r in records if r["status"] in FETCH_KEPT]
    blocked = takedowns.blocked("sha256", [r["sha256"] for r in held])
    for record in held:
        if record["sha256"] in blocked:
            record.update(
                status="taken_down",
                error="image sha256 under a takedown request",
                duplicate_of=None,
            )


def share_bytes(records: list[dict[str, Any]], spool: Spool) -> None:
    """Duplicates of bytes that this shard has (kept from an earlier run) get them back and
    are `ok` again, so that `mark_duplicates` decides every row that holds an image afresh."""
    with_bytes: dict[str, int] = {}
    for record in records:
        if record["status"] == "ok":
            with_bytes.setdefault(record["sha256"], record["row"])
    for record in records:
        if record["status"] == "duplicate" and record["sha256"] in with_bytes:
            spool.share(record["row"], with_bytes[record["sha256"]])
            record.update(status="ok", duplicate_of=None)


def kept_images(records: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """`(key, url, sha256)` of the records whose image was kept (ok, or a duplicate of one):
    what the takedown index holds."""
    return [
        (record["key"], record["url"], record["sha256"])
        for record in records
        if record["status"] in FETCH_KEPT and record["url"] and record["sha256"]
    ]


def mark_duplicates(records: list[dict[str, Any]], shard_id: str, dedup: DedupIndex) -> None:
    """Keep each image's bytes once across shards: the owner, the smallest (shard id, key)
    holding them, keeps them; every other row holding them becomes `duplicate` with
    `duplicate_of` naming the owner.

    Rows hold an image when `ok` (bytes in the spool) or `duplicate` (kept from an earlier
    run; the bytes are in another shard). This shard registers its first row per image."""
    first: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["status"] in FETCH_KEPT:
            first.setdefault(record["sha256"], record)
    owners = dedup.claim(shard_id, [(sha, record["key"]) for sha, record in first.items()])
    for record in records:
        if record["status"] not in FETCH_KEPT:
            continue
        owner = owners[record["sha256"]]
        if owner == (shard_id, record["key"]):
            # The owner. One without the bytes here (the index changed after this run
            # looked) stays as it was: the change made this shard stale, and its next run
            # fetches the bytes.
            continue
        record.update(status="duplicate", duplicate_of=f"{owner[0]}/{owner[1]}")


def write_tar(records: list[dict[str, Any]], spool: Spool, tar_path: Path) -> None:
    with WebDatasetWriter(tar_path) as tar:
        for record in records:
            if record["status"] == "ok":
                extension = EXTENSIONS.get(record["format"], "bin")
                tar.write_json(record["key"], spool.read(record["row"]), extension, _meta(record))


def error_rate_warnings(statuses: Counter[str], threshold: float) -> list[str]:
    rows = sum(statuses.values())
    failed = {s: n for s, n in statuses.items() if s not in FETCH_KEPT | FETCH_POLICY}
    share = sum(failed.values()) / rows if rows else 0.0
    if share <= threshold:
        return []
    breakdown = ", ".join(f"{status} {n}" for status, n in sorted(failed.items()))
    return [f"{share:.0%} of rows failed (over {threshold:.0%}): {breakdown}"]


def _record(row: SourceRow, status: str, error: str | None) -> dict[str, Any]:
    return {
        **{name: None for name in FETCH_SCHEMA.names},
        "key": row.key,
        "row": row.row,
        "url": _url_text(row.url),
        "caption": row.caption,
        "sample_id": row.sample_id,
        "status": status,
        "error": _error_text(error),
    }


def _url_text(cell: object) -> str | None:
    """The url cell as stored: its text, with what is not valid UTF-8 escaped and the
    userinfo of a URL that has some masked (such a URL is refused: `parse_url`)."""
    if cell is None:
        return None
    if isinstance(cell, str):
        return redact_userinfo(cell.encode("utf-8", "backslashreplace").decode("utf-8"))
    return redact_userinfo(quote(cell))


def _error_text(error: str | None) -> str | None:
    """A row's error as stored: credentials masked, valid UTF-8, cut short."""
    if error is None:
        return None
    text = redact_text(error.encode("utf-8", "backslashreplace").decode("utf-8"))
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS] + "..."


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
