"""Sources, shards and per-(shard, stage) state in Postgres.

Every write is a single-row upsert or an insert into the append-only `stage_events`, so
workers on different shards never contend for the same rows. Work on one (shard, stage) is
serialised by a session-level advisory lock held for the whole run (its key is 64 bits of a
sha256 of the pair, so no two pairs share one): a second worker is told the shard is busy, and
when a worker dies its connection closes and the lock is released, so a `running` row without
its lock is recognisably abandoned.

A lock can also be lost by a worker that is still running (Postgres restarted, the session
was ended by an idle timeout or `pg_terminate_backend`), and another worker may then start a
new attempt. The attempt number is the fencing token: whoever publishes an artifact first
confirms, inside `hold_attempt`, that its attempt is still the current one, and keeps the row
share-locked until the rename is done, so a new attempt can start only before or after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from facecaption.core.errors import PermanentError
from facecaption.core.redaction import redact_text

STATUSES = ("pending", "running", "done", "failed")

# Decoding the json columns of 25,000 stage rows is most of what a status or selection costs
# in Python; msgspec's decoder (an Airflow dependency) is about 4x the standard library's.
_decode_json = msgspec.json.Decoder().decode


class ShardBusyError(RuntimeError):
    """Another worker holds this (shard, stage)."""


class AttemptTakenOverError(ShardBusyError):
    """This worker lost its lock and another attempt started: its outputs are not published."""


class UnknownShardError(PermanentError, LookupError):
    """No shard with this id is registered."""


@dataclass(frozen=True)
class Source:
    source_id: str
    uri: str
    name: str
    size_bytes: int
    num_rows: int
    shard_size: int
    columns: dict[str, str | None]


@dataclass(frozen=True)
class SourceVersion:
    """What a filesystem said about a source file without reading it (size, modification
    time, ETag or another version marker) when its content was hashed."""

    size: int | None
    modified: str | None
    etag: str | None

    @property
    def comparable(self) -> bool:
        """Whether it can tell a change: a size and at least one marker."""
        return self.size is not None and (self.modified is not None or self.etag is not None)

    def same_as(self, other: SourceVersion) -> bool:
        """The same file version (so the same content as when it was hashed)."""
        return self.comparable and self == other


@dataclass(frozen=True)
class Shard:
    shard_id: str
    source_id: str
    shard_index: int
    row_start: int
    row_end: int
    source_uri: str
    columns: dict[str, str | None]
    # the version of `source_uri` its content hash was taken at (None: not recorded)
    source_version: SourceVersion | None = None

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start


@dataclass(frozen=True)
class StageState:
    shard_id: str
    stage: str
    status: str
    attempt: int = 0
    worker: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_error: str | None = None
    fingerprint: str | None = None
    warnings: list[str] = field(default_factory=list)
    # what the fingerprint covers, as recorded at `done` (None for rows from before 0005)
    inputs: dict[str, Any] | None = None
    # when the `retryable` work it left is due (None: at once; see 0006)
    retry_at: datetime | None = None

    def __post_init__(self) -> None:
        # Errors are redacted when written; rows written before that are redacted when read,
        # so no status page or shard view shows a credential an exception quoted.
        if self.last_error:
            object.__setattr__(self, "last_error", redact_text(self.last_error))


@dataclass(frozen=True)
class ShardFilter:
    """Which shards a status page shows: some ids (None: any), an id substring, and a status
    one of `stages` is in (a stage without a row is pending)."""

    shard_ids: tuple[str, ...] | None = None
    contains: str = ""
    status: str = ""
    stages: tuple[str, ...] = ()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def advisory_key(*parts: str) -> int:
    """A 64-bit advisory lock key for a tuple of names (for the one-argument bigint lock
    functions): the first 8 bytes of a sha256, so distinct tuples do not share a lock."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# How a refusal (a run stopped before it started an attempt) begins in `last_error`.
REFUSED = "refused before starting: "

LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock wait that ran past lock_timeout


class ShardState:
    """The state DB's shard tables, over one SQLAlchemy engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- sources and shards -------------------------------------------------------------

    def find_source(self, source_id: str) -> Source | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.text("SELECT * FROM sources WHERE source_id = :id"), {"id": source_id}
                )
                .mappings()
                .first()
            )
        return Source(**{k: row[k] for k in Source.__dataclass_fields__}) if row else None

    def find_source_file(self, uri: str) -> tuple[Source, SourceVersion] | None:
        """The source a file was last hashed as, and the file's version then."""
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.text(
                        "SELECT src.*, f.size_bytes AS file_size, f.modified, f.etag"
                        " FROM source_files f JOIN sources src USING (source_id)"
                        " WHERE f.uri = :uri"
                    ),
                    {"uri": uri},
                )
                .mappings()
                .first()
            )
        if row is None:
            return None
        source = Source(**{k: row[k] for k in Source.__dataclass_fields__})
        return source, SourceVersion(row["file_size"], row["modified"], row["etag"])

    def sources_read_from(self, uri: str) -> list[str]:
        """Ids of the sources whose shards read their rows from `uri`."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT source_id FROM sources WHERE uri = :uri ORDER BY 1"), {"uri": uri}
            )
            return [row.source_id for row in rows]

    def register_source(
        self,
        source: Source,
        shards: Sequence[tuple[str, int, int, int]],
        version: SourceVersion | None = None,
    ) -> int:
        """Register a source and its shards `(shard_id, index, start, end)`; return how many
        shards are new. Re-registering is harmless: known rows are left as they are, except
        the source's uri, which follows the file if it moved. `version` is what the
        filesystem said about the file when it was hashed: while it stays the same, the file
        is this source without hashing it again."""
        with self.engine.begin() as conn:
            # Planners of the same source queue here, so the count of new shards is exact.
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"),
                {"key": advisory_key("source", source.source_id)},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO sources (source_id, uri, name, size_bytes, num_rows,"
                    " shard_size, columns) VALUES (:source_id, :uri, :name, :size_bytes,"
                    " :num_rows, :shard_size, CAST(:columns AS jsonb))"
                    " ON CONFLICT (source_id) DO UPDATE SET uri = EXCLUDED.uri"
                ),
                {**source.__dict__, "columns": json.dumps(source.columns)},
            )
            if version is not None and version.comparable:
                conn.execute(
                    sa.text(
                        "INSERT INTO source_files (uri, source_id, size_bytes, modified, etag)"
                        " VALUES (:uri, :id, :size, :modified, :etag) ON CONFLICT (uri) DO"
                        " UPDATE SET source_id = EXCLUDED.source_id, size_bytes ="
                        " EXCLUDED.size_bytes, modified = EXCLUDED.modified, etag ="
                        " EXCLUDED.etag, checked_at = now()"
                    ),
                    {"uri": source.uri, "id": source.source_id, "size": version.size,
                     "modified": version.modified, "etag": version.etag},
                )  # fmt: skip
            if not shards:
                return 0
            count = sa.text("SELECT count(*) FROM shards WHERE source_id = :id")
            before = conn.execute(count, {"id": source.source_id}).scalar_one()
            if before == len(shards):
                return 0  # planned before, every shard registered
            conn.execute(
                sa.text(
                    "INSERT INTO shards (shard_id, source_id, shard_index, row_start, row_end)"
                    " SELECT i, :source, x, s, e FROM unnest(CAST(:ids AS text[]),"
                    " CAST(:indexes AS integer[]), CAST(:starts AS bigint[]),"
                    " CAST(:ends AS bigint[])) AS t(i, x, s, e) ON CONFLICT DO NOTHING"
                ),
                {
                    "source": source.source_id,
                    "ids": [shard[0] for shard in shards],
                    "indexes": [shard[1] for shard in shards],
                    "starts": [shard[2] for shard in shards],
                    "ends": [shard[3] for shard in shards],
                },
            )
            return conn.execute(count, {"id": source.source_id}).scalar_one() - before

    _SHARD_QUERY = (
        "SELECT s.shard_id, s.source_id, s.shard_index, s.row_start, s.row_end,"
        " src.uri AS source_uri, src.columns::text AS columns, f.size_bytes AS file_size,"
        " f.modified AS file_modified, f.etag AS file_etag FROM shards s"
        " JOIN sources src ON src.source_id = s.source_id"
        " LEFT JOIN source_files f ON f.uri = src.uri AND f.source_id = src.source_id"
    )
    _SHARD_ORDER = " ORDER BY src.registered_at, s.source_id, s.shard_index"

    @staticmethod
    def _shard(row: Any) -> Shard:
        version = (
            SourceVersion(row["file_size"], row["file_modified"], row["file_etag"])
            if row["file_size"] is not None
            else None
        )
        fields = {k: row[k] for k in Shard.__dataclass_fields__ if k != "source_version"}
        # as text, decoded here: psycopg2's json.loads costs 10x msgspec's at 5,000 shards
        fields["columns"] = _decode_json(fields["columns"])
        return Shard(**fields, source_version=version)

    def get_shard(self, shard_id: str) -> Shard:
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.text(self._SHARD_QUERY + " WHERE s.shard_id = :id"), {"id": shard_id}
                )
                .mappings()
                .first()
            )
        if row is None:
            raise UnknownShardError(f"no shard {shard_id!r} is registered; run `facecaption plan`")
        return self._shard(row)

    def list_shards(
        self, source_ids: Sequence[str] | None = None, shard_ids: Sequence[str] | None = None
    ) -> list[Shard]:
        """Shards in planning order: all, or those of some sources, or some shard ids (one
        query whatever the number)."""
        query = self._SHARD_QUERY
        params: dict[str, Any] = {}
        if source_ids is not None:
            query += " WHERE s.source_id = ANY(:ids)"
            params["ids"] = list(source_ids)
        elif shard_ids is not None:
            query += " WHERE s.shard_id = ANY(:ids)"
            params["ids"] = list(shard_ids)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(query + self._SHARD_ORDER), params).mappings()
            return [self._shard(row) for row in rows]

    def filter_shards(
        self, shard_filter: ShardFilter, limit: int | None = None, offset: int = 0
    ) -> tuple[list[Shard], int, int]:
        """Shards that pass the filter in planning order (a page of them with `limit` and
        `offset`), how many pass it, and how many are registered: one query."""
        conditions, params = ["TRUE"], {"stages": list(shard_filter.stages)}
        if shard_filter.shard_ids is not None:
            conditions.append("s.shard_id = ANY(:ids)")
            params["ids"] = list(shard_filter.shard_ids)
        if shard_filter.contains:
            conditions.append("strpos(s.shard_id, :contains) > 0")
            params["contains"] = shard_filter.contains
        if shard_filter.status == "pending":  # some stage without a row, or a pending row
            conditions.append(
                "(SELECT count(*) FROM shard_stages ss WHERE ss.shard_id = s.shard_id"
                " AND ss.stage = ANY(:stages) AND ss.status <> 'pending') < :stage_count"
            )
            params["stage_count"] = len(shard_filter.stages)
        elif shard_filter.status:
            conditions.append(
                "EXISTS (SELECT 1 FROM shard_stages ss WHERE ss.shard_id = s.shard_id"
                " AND ss.stage = ANY(:stages) AND ss.status = :status)"
            )
            params["status"] = shard_filter.status
        query = (
            "WITH registered AS (SELECT count(*) AS n FROM shards),"
            " matched AS (SELECT s.shard_id FROM shards s WHERE " + " AND ".join(conditions) + ")"
            " SELECT page.*, (SELECT count(*) FROM matched) AS matched_count,"
            " (SELECT n FROM registered) AS registered_count FROM (SELECT 1) one"
            " LEFT JOIN LATERAL (" + self._SHARD_QUERY
            + " WHERE s.shard_id IN (SELECT shard_id FROM matched)" + self._SHARD_ORDER
            + " LIMIT :limit OFFSET :offset) page ON TRUE"
        )  # fmt: skip
        params.update(limit=limit, offset=offset)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(query), params).mappings().all()
        shards = [self._shard(row) for row in rows if row["shard_id"] is not None]
        return shards, int(rows[0]["matched_count"]), int(rows[0]["registered_count"])

    # -- stage state --------------------------------------------------------------------

    def get_stage(self, shard_id: str, stage: str) -> StageState:
        with self.engine.connect() as conn:
            return self._get_stage(conn, shard_id, stage)

    @staticmethod
    def _get_stage(conn: Connection, shard_id: str, stage: str) -> StageState:
        row = (
            conn.execute(
                sa.text("SELECT * FROM shard_stages WHERE shard_id = :s AND stage = :t"),
                {"s": shard_id, "t": stage},
            )
            .mappings()
            .first()
        )
        if row is None:
            return StageState(shard_id, stage, "pending")
        return StageState(**{k: row[k] for k in StageState.__dataclass_fields__})

    def stage_table(
        self,
        shard_ids: Sequence[str] | None = None,
        *,
        artifacts: bool = True,
        stages: Sequence[str] | None = None,
    ) -> list[StageState]:
        """Every stage row of some shards (None: all), of some `stages` (None: all); without
        `artifacts`, their artifacts are left empty. The json columns come as text and are
        decoded here with msgspec (an empty list of warnings not at all): at 25,000 rows
        decoding is most of the cost."""
        rows = self._stage_rows(
            "SELECT shard_id, stage, status, attempt, worker, started_at, finished_at,"
            f" counts::text, {'artifacts::text' if artifacts else 'NULL'}, last_error,"
            " fingerprint, warnings::text, retry_at FROM shard_stages",
            shard_ids,
            stages=stages,
        )
        loads = _decode_json
        # unpacked, not read by name: at 25,000 rows a named read of each column costs more
        # than decoding the json columns
        return [
            StageState(
                shard_id, stage, status, attempt, worker, started_at, finished_at,
                loads(counts), {} if artifacts_text is None else loads(artifacts_text),
                last_error, fingerprint, [] if warnings == "[]" else loads(warnings),
                retry_at=retry_at,
            )
            for (
                shard_id, stage, status, attempt, worker, started_at, finished_at, counts,
                artifacts_text, last_error, fingerprint, warnings, retry_at,
            ) in rows
        ]  # fmt: skip

    def work_table(
        self, shard_ids: Sequence[str] | None = None, checked_inputs: dict[str, str] | None = None
    ) -> list[StageState]:
        """The stage rows as work selection reads them: status, attempt, fingerprint,
        artifacts, of the counts only `retryable` (what selection looks at, with `retry_at`,
        when that work is due), and of the inputs each ran on only the one `checked_inputs`
        names for its stage (stage -> the input stage whose checksums they are checked
        against; {} for the others, None for rows from before inputs were recorded)."""
        checked = checked_inputs or {}
        rows = self._stage_rows(
            "SELECT shard_id, stage, status, attempt, fingerprint, artifacts::text,"
            " CASE WHEN jsonb_typeof(counts -> 'retryable') = 'number'"
            " THEN (counts ->> 'retryable')::numeric END, retry_at, inputs IS NULL,"
            " checked.input, (inputs -> checked.input)::text FROM shard_stages"
            " LEFT JOIN unnest(CAST(:stages AS text[]), CAST(:inputs AS text[]))"
            " AS checked (stage, input) USING (stage)",
            shard_ids,
            {"stages": list(checked), "inputs": list(checked.values())},
        )
        loads = _decode_json
        return [
            StageState(
                shard_id, stage, status, attempt,
                counts={"retryable": int(retryable)} if retryable else {},
                artifacts=loads(artifacts), fingerprint=fingerprint,
                inputs=(
                    None if unrecorded else {} if ran_on is None else {checked_input: loads(ran_on)}
                ),
                retry_at=retry_at,
            )
            for (
                shard_id, stage, status, attempt, fingerprint, artifacts, retryable, retry_at,
                unrecorded, checked_input, ran_on,
            ) in rows
        ]  # fmt: skip

    def _stage_rows(
        self,
        select: str,
        shard_ids: Sequence[str] | None,
        params: dict[str, Any] | None = None,
        stages: Sequence[str] | None = None,
    ) -> list[Any]:
        filters, params = [], dict(params or {})
        if shard_ids is not None:
            filters.append("shard_id = ANY(:ids)")
            params["ids"] = list(shard_ids)
        if stages is not None:
            filters.append("stage = ANY(:stage_names)")
            params["stage_names"] = list(stages)
        query = select + (" WHERE " + " AND ".join(filters) if filters else "")
        with self.engine.connect() as conn:
            return conn.execute(sa.text(query), params).all()

    def stage_totals(
        self, registered: int, stages: Sequence[str], status: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """Per stage over all `registered` shards: shards by status (a shard without a row is
        pending) and the sum of each numeric count (of rows in `status`, or all): two
        aggregate queries, whatever the number of shards."""
        totals: dict[str, dict[str, Any]] = {s: {"shards": {}, "counts": {}} for s in stages}
        with self.engine.connect() as conn:
            for row in conn.execute(
                sa.text(
                    "SELECT stage, status, count(*) AS shards FROM shard_stages"
                    " GROUP BY stage, status ORDER BY stage, status"
                )
            ):
                if row.stage in totals:
                    totals[row.stage]["shards"][row.status] = row.shards
            for row in conn.execute(
                sa.text(
                    "SELECT ss.stage, c.key, sum((c.value)::numeric) AS total"
                    " FROM shard_stages ss CROSS JOIN LATERAL jsonb_each(ss.counts) c"
                    " WHERE jsonb_typeof(c.value) = 'number'"
                    + (" AND ss.status = :status" if status else "")
                    + " GROUP BY ss.stage, c.key ORDER BY ss.stage, c.key"
                ),
                {"status": status},
            ):
                if row.stage in totals:
                    total = row.total
                    totals[row.stage]["counts"][row.key] = (
                        int(total) if total == total.to_integral_value() else float(total)
                    )
        for entry in totals.values():
            missing = registered - sum(entry["shards"].values())
            if missing > 0:
                entry["shards"]["pending"] = entry["shards"].get("pending", 0) + missing
        return totals

    @contextmanager
    def claim(self, shard_id: str, stage: str, *, wait_s: float = 0) -> Iterator[Connection]:
        """Hold the (shard, stage) advisory lock for the duration of the block; wait up to
        `wait_s` seconds for a worker that holds it, then ShardBusyError."""
        key = advisory_key(stage, shard_id)
        with self.engine.connect() as conn:
            if wait_s > 0:
                got = self._wait_for_lock(conn, key, wait_s)
            else:
                got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": key})
                got = bool(got.scalar())
                conn.commit()
            if not got:
                raise ShardBusyError(f"{stage} of shard {shard_id} is running elsewhere")
            try:
                yield conn
            finally:
                self._release(conn, key)

    @staticmethod
    def _wait_for_lock(conn: Connection, key: int, wait_s: float) -> bool:
        try:
            # lock_timeout bounds the wait; set for this transaction only
            conn.execute(
                sa.text("SELECT set_config('lock_timeout', :ms, true)"),
                {"ms": f"{max(1, round(wait_s * 1000))}ms"},
            )
            conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        except sa.exc.OperationalError as error:
            conn.rollback()
            if getattr(error.orig, "pgcode", None) == LOCK_NOT_AVAILABLE:
                return False
            raise
        conn.commit()  # a session lock outlives the transaction that took it
        return True

    @staticmethod
    def _release(conn: Connection, key: int) -> None:
        # A failed statement in the block leaves the transaction aborted; session locks
        # survive a rollback, so roll back first, then unlock.
        try:
            conn.rollback()
            conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            conn.commit()
        except sa.exc.DBAPIError:
            # Closing the server session releases its locks; never return it to the pool.
            conn.invalidate()

    @contextmanager
    def hold_attempt(self, shard_id: str, stage: str, attempt: int) -> Iterator[None]:
        """Confirm that `attempt` is still the current, running attempt of (shard, stage) and
        keep it so for the block (a new attempt waits until the block ends); otherwise
        AttemptTakenOverError. Publishing an artifact happens inside this block."""
        with self.engine.begin() as conn:
            confirm_attempt(conn, shard_id, stage, attempt)
            yield

    def mark_running(self, shard_id: str, stage: str, fingerprint: str, worker: str) -> int:
        """Start a new attempt; return its number. Call only while holding `claim`."""
        with self.engine.begin() as conn:
            previous = self._get_stage(conn, shard_id, stage)
            if previous.status == "running":
                # We hold the lock, so whoever marked it running is gone.
                self._event(
                    conn,
                    shard_id,
                    stage,
                    previous.attempt,
                    "abandoned",
                    worker=previous.worker,
                    error="worker died or was killed",
                )
            attempt = previous.attempt + 1
            conn.execute(
                sa.text(
                    # The row's fingerprint keeps describing its artifacts until `done`.
                    "INSERT INTO shard_stages (shard_id, stage, status, attempt, worker,"
                    " started_at, finished_at, last_error, updated_at)"
                    " VALUES (:s, :t, 'running', :a, :w, now(), NULL, NULL, now())"
                    " ON CONFLICT (shard_id, stage) DO UPDATE SET status = 'running',"
                    " attempt = :a, worker = :w, started_at = now(), finished_at = NULL,"
                    " last_error = NULL, updated_at = now()"
                ),
                {"s": shard_id, "t": stage, "a": attempt, "w": worker},
            )
            self._event(
                conn, shard_id, stage, attempt, "started", worker=worker, fingerprint=fingerprint
            )
        return attempt

    def mark_done(
        self,
        shard_id: str,
        stage: str,
        attempt: int,
        counts: dict[str, Any],
        artifacts: dict[str, dict[str, Any]],
        fingerprint: str,
        warnings: list[str] | None = None,
        inputs: dict[str, Any] | None = None,
        stats: dict[str, Any] | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        """Finish `attempt` as done with its outputs; AttemptTakenOverError when it is no
        longer current. `stats` (report statistics) are kept in `stage_stats`, not in the
        history; `retry_at` is when the `retryable` work it left is due (None: at once)."""
        self._finish(
            shard_id,
            stage,
            attempt,
            "done",
            counts=counts,
            artifacts=artifacts,
            fingerprint=fingerprint,
            warnings=warnings or [],
            inputs=inputs,
            stats=stats,
            retry_at=retry_at,
        )

    def mark_failed(self, shard_id: str, stage: str, attempt: int, error: str) -> None:
        """Finish `attempt` as failed with its error (credentials in it masked). An attempt
        that was taken over leaves the current row alone: its failure goes into the history
        only."""
        error = redact_text(error)
        try:
            self._finish(shard_id, stage, attempt, "failed", error=error)
        except AttemptTakenOverError:
            with self.engine.begin() as conn:
                self._event(conn, shard_id, stage, attempt, "failed", worker=worker_name(),
                            error=error)  # fmt: skip

    def record_refusal(self, shard_id: str, stage: str, error: str) -> None:
        """Record why a run of (shard, stage) stopped before it started an attempt (its input
        stage not done, a model not installed, ...) as the row's last error, prefixed with
        REFUSED, credentials in it masked; its status and attempt stay as they are (a stage
        never run gets a pending row). Call only while holding `claim`. The history keeps
        attempts only, so a refusal is not an event."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO shard_stages (shard_id, stage, status, attempt, last_error,"
                    " updated_at) VALUES (:s, :t, 'pending', 0, :e, now())"
                    " ON CONFLICT (shard_id, stage) DO UPDATE SET last_error = :e,"
                    " updated_at = now() WHERE shard_stages.status <> 'running'"
                ),
                {"s": shard_id, "t": stage, "e": f"{REFUSED}{redact_text(error)}"},
            )

    def _finish(
        self,
        shard_id: str,
        stage: str,
        attempt: int,
        status: str,
        *,
        counts: dict[str, Any] | None = None,
        artifacts: dict[str, dict[str, Any]] | None = None,
        fingerprint: str | None = None,
        error: str | None = None,
        warnings: list[str] | None = None,
        inputs: dict[str, Any] | None = None,
        stats: dict[str, Any] | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        with self.engine.begin() as conn:
            started = conn.execute(
                sa.text(
                    "UPDATE shard_stages SET status = :st, finished_at = now(),"
                    " counts = COALESCE(CAST(:c AS jsonb), counts),"
                    " artifacts = COALESCE(CAST(:a AS jsonb), artifacts),"
                    " fingerprint = COALESCE(:f, fingerprint), last_error = :e,"
                    " warnings = COALESCE(CAST(:w AS jsonb), warnings),"
                    " inputs = COALESCE(CAST(:i AS jsonb), inputs),"
                    " retry_at = CASE WHEN CAST(:st AS text) = 'done' THEN CAST(:r AS timestamptz)"
                    " ELSE retry_at END,"
                    " updated_at = now()"
                    " WHERE shard_id = :s AND stage = :t AND attempt = :n AND status = 'running'"
                    " RETURNING worker, started_at, finished_at"
                ),
                {
                    "st": status,
                    "c": json.dumps(counts) if counts is not None else None,
                    "a": json.dumps(artifacts) if artifacts is not None else None,
                    "f": fingerprint,
                    "e": error,
                    "w": json.dumps(warnings) if warnings is not None else None,
                    "i": json.dumps(inputs) if inputs is not None else None,
                    "r": retry_at,
                    "s": shard_id,
                    "t": stage,
                    "n": attempt,
                },
            ).first()
            if started is None:
                confirm_attempt(conn, shard_id, stage, attempt)  # raises, naming who has it
                raise AttemptTakenOverError(f"{stage} of shard {shard_id}: attempt {attempt} ended")
            if stats is not None:
                self._record_stats(conn, shard_id, stage, attempt, stats)
            duration = (started.finished_at - started.started_at).total_seconds()
            self._event(
                conn,
                shard_id,
                stage,
                attempt,
                status,
                worker=started.worker,
                duration_s=duration,
                counts=counts,
                artifacts=artifacts,
                error=error,
                fingerprint=fingerprint,
                warnings=warnings,
            )

    def record_stats(self, shard_id: str, stage: str, attempt: int, stats: dict[str, Any]) -> None:
        """Store the report statistics of a finished attempt (worked out after the fact)."""
        with self.engine.begin() as conn:
            self._record_stats(conn, shard_id, stage, attempt, stats)

    @staticmethod
    def _record_stats(
        conn: Connection, shard_id: str, stage: str, attempt: int, stats: dict[str, Any]
    ) -> None:
        conn.execute(
            sa.text(
                "INSERT INTO stage_stats (shard_id, stage, attempt, stats) VALUES (:s, :t, :n,"
                " CAST(:stats AS jsonb)) ON CONFLICT (shard_id, stage) DO UPDATE SET"
                " attempt = EXCLUDED.attempt, stats = EXCLUDED.stats, updated_at = now()"
            ),
            {"s": shard_id, "t": stage, "n": attempt, "stats": json.dumps(stats)},
        )

    def finished_stats(
        self, stage: str, leave_out: Sequence[str] = ()
    ) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
        """For every shard whose `stage` finished (done, or running again after finishing):
        the statistics of its last finished attempt (without their top-level keys named in
        `leave_out`: bulky parts read apart with `stats_items`), and, apart, the shards (with
        their attempt) done without statistics (finished before statistics were kept). One
        query."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    # Sorted before the statistics become text, so the sort holds ids and
                    # TOAST pointers, not 5,000 texts of KBs (which spilled to disk); the
                    # outer ORDER BY costs nothing: the rows come sorted.
                    "SELECT f.shard_id, f.status, f.attempt,"
                    " (f.stats - CAST(:leave_out AS text[]))::text FROM (SELECT ss.shard_id,"
                    " ss.status, ss.attempt, st.stats FROM shard_stages ss"
                    " LEFT JOIN stage_stats st ON st.shard_id = ss.shard_id"
                    " AND st.stage = ss.stage WHERE ss.stage = :stage"
                    " AND ss.status IN ('done', 'running') ORDER BY ss.shard_id) f"
                    " ORDER BY f.shard_id"
                ),
                {"stage": stage, "leave_out": list(leave_out)},
            )
            stats: dict[str, dict[str, Any]] = {}
            missing: dict[str, int] = {}
            for shard_id, status, attempt, text in rows:
                if text is not None:
                    stats[shard_id] = _decode_json(text)
                elif status == "done":
                    missing[shard_id] = attempt
            return stats, missing

    def stats_items(
        self, stage: str, key: str, items: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Any]:
        """`stats[key][name]` of the stored statistics of `stage` for each `(shard id, name)`
        in `items` that has one: a few entries of a bulky part, in one query."""
        if not items:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT i.shard_id, i.name, (st.stats -> :key -> i.name)::text AS value"
                    " FROM unnest(CAST(:shards AS text[]), CAST(:names AS text[]))"
                    " AS i (shard_id, name) JOIN stage_stats st ON st.shard_id = i.shard_id"
                    " AND st.stage = :stage WHERE st.stats -> :key -> i.name IS NOT NULL"
                ),
                {
                    "stage": stage,
                    "key": key,
                    "shards": [shard_id for shard_id, _ in items],
                    "names": [name for _, name in items],
                },
            )
            return {(row.shard_id, row.name): _decode_json(row.value) for row in rows}

    def shard_totals(self) -> tuple[int, int]:
        """Registered shards and the source rows they cover."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT count(*), COALESCE(sum(row_end - row_start), 0) FROM shards")
            ).one()
            return int(row[0]), int(row[1])

    @staticmethod
    def _event(
        conn: Connection,
        shard_id: str,
        stage: str,
        attempt: int,
        event: str,
        **fields: Any,
    ) -> None:
        values = {
            "worker": None,
            "duration_s": None,
            "counts": None,
            "artifacts": None,
            "error": None,
            "fingerprint": None,
            "warnings": None,
            **fields,
        }
        for key in ("counts", "artifacts", "warnings"):
            if values[key] is not None:
                values[key] = json.dumps(values[key])
        conn.execute(
            sa.text(
                "INSERT INTO stage_events (shard_id, stage, attempt, event, worker, duration_s,"
                " counts, artifacts, error, fingerprint, warnings) VALUES (:s, :t, :n, :ev,"
                " :worker, :duration_s, CAST(:counts AS jsonb), CAST(:artifacts AS jsonb),"
                " :error, :fingerprint, CAST(:warnings AS jsonb))"
            ),
            {"s": shard_id, "t": stage, "n": attempt, "ev": event, **values},
        )

    def events(self, shard_id: str, stage: str | None = None) -> list[dict[str, Any]]:
        """The attempt history of a shard's stage (or of all its stages), oldest first; errors
        with credentials masked (rows written before errors were masked when written)."""
        query = "SELECT * FROM stage_events WHERE shard_id = :s"
        if stage is not None:
            query += " AND stage = :t"
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(query + " ORDER BY event_id"), {"s": shard_id, "t": stage})
            return [
                {**row, "error": redact_text(row["error"]) if row["error"] else row["error"]}
                for row in rows.mappings()
            ]


def confirm_attempt(conn: Connection, shard_id: str, stage: str, attempt: int) -> None:
    """In `conn`'s transaction: `attempt` is the current, running attempt of (shard, stage),
    and stays so until the transaction ends (the row is share-locked, so starting a new
    attempt waits); AttemptTakenOverError otherwise."""
    row = conn.execute(
        sa.text(
            "SELECT attempt, status, worker FROM shard_stages"
            " WHERE shard_id = :s AND stage = :t FOR SHARE"
        ),
        {"s": shard_id, "t": stage},
    ).first()
    if row is None or row.attempt != attempt or row.status != "running":
        raise AttemptTakenOverError(_taken_over(shard_id, stage, attempt, row))


def _taken_over(shard_id: str, stage: str, attempt: int, current: Any) -> str:
    if current is None:
        return f"{stage} of shard {shard_id}: attempt {attempt} has no state row any more"
    if current.attempt == attempt:
        return f"{stage} of shard {shard_id}: attempt {attempt} is {current.status}, not running"
    return (
        f"{stage} of shard {shard_id}: attempt {attempt} lost its lock and was taken over by"
        f" attempt {current.attempt} ({current.worker}, {current.status}); its outputs were not"
        " published"
    )
