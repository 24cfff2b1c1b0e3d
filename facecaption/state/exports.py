"""The `exports` table: one row per published release (what it was built from, which files
it wrote, removed and kept, which takedown requests it honoured); and `release_attempts`, the
fencing tokens of publishes: only the newest may rename files into the release folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from facecaption.state.shards import ShardBusyError


def record_export(
    engine: Engine,
    release_uri: str,
    manifest_sha256: str,
    manifest: dict[str, Any],
    written: list[str],
    removed: list[str],
    kept: list[str],
) -> int:
    with engine.begin() as conn:
        return int(
            conn.execute(
                sa.text(
                    "INSERT INTO exports (release_uri, manifest_sha256, rows, files_written,"
                    " files_removed, files_kept, built_from, takedown_ids) VALUES (:uri, :sha,"
                    " :rows, CAST(:written AS jsonb), CAST(:removed AS jsonb),"
                    " CAST(:kept AS jsonb), CAST(:built AS jsonb), CAST(:takedowns AS jsonb))"
                    " RETURNING export_id"
                ),
                {
                    "uri": release_uri,
                    "sha": manifest_sha256,
                    "rows": manifest["rows"],
                    "written": json.dumps(written),
                    "removed": json.dumps(removed),
                    "kept": json.dumps(kept),
                    "built": json.dumps(manifest["built_from"]),
                    "takedowns": json.dumps(manifest["takedown_requests"]),
                },
            ).scalar_one()
        )


class ReleaseTakenOverError(ShardBusyError):
    """A newer publish started after this one lost the release lock: this one publishes
    nothing more."""


def start_release_attempt(engine: Engine, worker: str) -> int:
    """The next publish attempt, newest from now on; call only while holding the release
    lock. It waits for an older attempt that is renaming a file right now."""
    with engine.begin() as conn:
        conn.execute(
            sa.text("SELECT attempt FROM release_attempts ORDER BY attempt DESC LIMIT 1 FOR UPDATE")
        )
        return int(
            conn.execute(
                sa.text("INSERT INTO release_attempts (worker) VALUES (:w) RETURNING attempt"),
                {"w": worker},
            ).scalar_one()
        )


@contextmanager
def hold_release_attempt(engine: Engine, attempt: int) -> Iterator[None]:
    """Confirm that `attempt` is the newest publish and keep it so for the block (a newer one
    starts only after it): publishing a release file happens inside."""
    with engine.begin() as conn:
        mine = conn.execute(
            sa.text("SELECT attempt FROM release_attempts WHERE attempt = :a FOR SHARE"),
            {"a": attempt},
        ).first()
        newer = conn.execute(
            sa.text("SELECT max(attempt) FROM release_attempts WHERE attempt > :a"),
            {"a": attempt},
        ).scalar()
        if mine is None or newer is not None:
            raise ReleaseTakenOverError(
                f"publish attempt {attempt} lost the release lock and publish {newer} started:"
                " this one publishes nothing more"
            )
        yield
