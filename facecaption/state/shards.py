"""Sources, shards and per-(shard, stage) state in Postgres.

Every write is a single-row upsert or an insert into the append-only `stage_events`, so
workers on different shards never contend for the same rows. Work on one (shard, stage) is
serialised by a session-level advisory lock held for the whole run: a second worker is told
the shard is busy, and when a worker dies its connection closes and the lock is released, so
a `running` row without its lock is recognisably abandoned.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from facecaption.core.errors import PermanentError

STATUSES = ("pending", "running", "done", "failed")


class ShardBusyError(RuntimeError):
    """Another worker holds this (shard, stage)."""


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
class Shard:
    shard_id: str
    source_id: str
    shard_index: int
    row_start: int
    row_end: int
    source_uri: str
    columns: dict[str, str | None]

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


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _lock_keys(shard_id: str, stage: str) -> dict[str, str]:
    return {"stage": stage, "shard": shard_id}


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

    def register_source(self, source: Source, shards: Sequence[tuple[str, int, int, int]]) -> int:
        """Register a source and its shards `(shard_id, index, start, end)`; return how many
        shards are new. Re-registering is harmless: known rows are left as they are, except
        the source's uri, which follows the file if it moved."""
        with self.engine.begin() as conn:
            # Planners of the same source queue here, so the count of new shards is exact.
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(hashtext(:id))"), {"id": source.source_id}
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
            if not shards:
                return 0
            count = sa.text("SELECT count(*) FROM shards WHERE source_id = :id")
            before = conn.execute(count, {"id": source.source_id}).scalar_one()
            conn.execute(
                sa.text(
                    "INSERT INTO shards (shard_id, source_id, shard_index, row_start, row_end)"
                    " VALUES (:shard_id, :source_id, :shard_index, :row_start, :row_end)"
                    " ON CONFLICT DO NOTHING"
                ),
                [
                    {
                        "shard_id": shard_id,
                        "source_id": source.source_id,
                        "shard_index": index,
                        "row_start": start,
                        "row_end": end,
                    }
                    for shard_id, index, start, end in shards
                ],
            )
            return conn.execute(count, {"id": source.source_id}).scalar_one() - before

    _SHARD_QUERY = (
        "SELECT s.shard_id, s.source_id, s.shard_index, s.row_start, s.row_end,"
        " src.uri AS source_uri, src.columns FROM shards s"
        " JOIN sources src ON src.source_id = s.source_id"
    )

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
        return Shard(**row)

    def list_shards(self, source_ids: Sequence[str] | None = None) -> list[Shard]:
        query = self._SHARD_QUERY
        params: dict[str, Any] = {}
        if source_ids is not None:
            query += " WHERE s.source_id = ANY(:ids)"
            params["ids"] = list(source_ids)
        query += " ORDER BY src.registered_at, s.source_id, s.shard_index"
        with self.engine.connect() as conn:
            return [Shard(**row) for row in conn.execute(sa.text(query), params).mappings()]

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

    def stage_table(self, shard_ids: Sequence[str] | None = None) -> list[StageState]:
        query = "SELECT * FROM shard_stages"
        params: dict[str, Any] = {}
        if shard_ids is not None:
            query += " WHERE shard_id = ANY(:ids)"
            params["ids"] = list(shard_ids)
        with self.engine.connect() as conn:
            return [
                StageState(**{k: row[k] for k in StageState.__dataclass_fields__})
                for row in conn.execute(sa.text(query), params).mappings()
            ]

    @contextmanager
    def claim(self, shard_id: str, stage: str) -> Iterator[Connection]:
        """Hold the (shard, stage) advisory lock for the duration of the block."""
        with self.engine.connect() as conn:
            got = conn.execute(
                sa.text("SELECT pg_try_advisory_lock(hashtext(:stage), hashtext(:shard))"),
                _lock_keys(shard_id, stage),
            ).scalar()
            conn.commit()
            if not got:
                raise ShardBusyError(f"{stage} of shard {shard_id} is running elsewhere")
            try:
                yield conn
            finally:
                self._release(conn, shard_id, stage)

    @staticmethod
    def _release(conn: Connection, shard_id: str, stage: str) -> None:
        # A failed statement in the block leaves the transaction aborted; session locks
        # survive a rollback, so roll back first, then unlock.
        try:
            conn.rollback()
            conn.execute(
                sa.text("SELECT pg_advisory_unlock(hashtext(:stage), hashtext(:shard))"),
                _lock_keys(shard_id, stage),
            )
            conn.commit()
        except sa.exc.DBAPIError:
            # Closing the server session releases its locks; never return it to the pool.
            conn.invalidate()

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
    ) -> None:
        self._finish(
            shard_id,
            stage,
            attempt,
            "done",
            counts=counts,
            artifacts=artifacts,
            fingerprint=fingerprint,
            warnings=warnings or [],
        )

    def mark_failed(self, shard_id: str, stage: str, attempt: int, error: str) -> None:
        self._finish(shard_id, stage, attempt, "failed", error=error)

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
    ) -> None:
        with self.engine.begin() as conn:
            started = conn.execute(
                sa.text(
                    "UPDATE shard_stages SET status = :st, finished_at = now(),"
                    " counts = COALESCE(CAST(:c AS jsonb), counts),"
                    " artifacts = COALESCE(CAST(:a AS jsonb), artifacts),"
                    " fingerprint = COALESCE(:f, fingerprint), last_error = :e,"
                    " warnings = COALESCE(CAST(:w AS jsonb), warnings), updated_at = now()"
                    " WHERE shard_id = :s AND stage = :t AND attempt = :n"
                    " RETURNING worker, started_at, finished_at"
                ),
                {
                    "st": status,
                    "c": json.dumps(counts) if counts is not None else None,
                    "a": json.dumps(artifacts) if artifacts is not None else None,
                    "f": fingerprint,
                    "e": error,
                    "w": json.dumps(warnings) if warnings is not None else None,
                    "s": shard_id,
                    "t": stage,
                    "n": attempt,
                },
            ).first()
            if started is None:
                raise RuntimeError(f"attempt {attempt} of {stage}/{shard_id} is not current")
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
        """The attempt history of a shard's stage (or of all its stages), oldest first."""
        query = "SELECT * FROM stage_events WHERE shard_id = :s"
        if stage is not None:
            query += " AND stage = :t"
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(query + " ORDER BY event_id"), {"s": shard_id, "t": stage})
            return [dict(row) for row in rows.mappings()]
