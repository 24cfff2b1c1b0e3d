"""The rows of a stage's work that failed transiently and that a later run may try again, kept
across runs in `row_retries`: per (shard, stage, key) how many runs tried it, when the last
did, and when the next may. A stage reads a shard's keys before it runs and replaces them with
what is still pausing after it published (`facecaption.core.retry_budget` decides the
numbers). Keys are the stage's own row names as text: fetch's source row numbers, caption's
face ids. One query to read, one transaction to replace, whatever the number of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine


@dataclass(frozen=True)
class RowRetry:
    """One row's place in its retry budget."""

    key: str  # the row as its stage names it (fetch: the row number; caption: the face id)
    runs: int  # runs that tried it and got a transient failure
    tried_at: datetime  # when the last of them did
    due_at: datetime  # from when a run may try it again


class RowRetryLedger:
    """`row_retries` of one stage over one engine."""

    def __init__(self, engine: Engine, stage: str) -> None:
        self.engine = engine
        self.stage = stage

    def rows(self, shard_id: str) -> dict[str, RowRetry]:
        """The shard's rows waiting for another run, by key."""
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.text(
                    "SELECT key, runs, tried_at, due_at FROM row_retries"
                    " WHERE shard_id = :s AND stage = :t"
                ),
                {"s": shard_id, "t": self.stage},
            )
            return {r.key: RowRetry(r.key, r.runs, r.tried_at, r.due_at) for r in found}

    def replace(self, shard_id: str, retries: Sequence[RowRetry]) -> None:
        """Make `retries` the shard's rows (rows that became final leave)."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.text("DELETE FROM row_retries WHERE shard_id = :s AND stage = :t"),
                {"s": shard_id, "t": self.stage},
            )
            if not retries:
                return
            conn.execute(
                sa.text(
                    "INSERT INTO row_retries (shard_id, stage, key, runs, tried_at, due_at)"
                    " SELECT :s, :t, k, n, tr, d FROM unnest(CAST(:keys AS text[]),"
                    " CAST(:runs AS integer[]), CAST(:tried AS timestamptz[]),"
                    " CAST(:due AS timestamptz[])) AS x(k, n, tr, d)"
                ),
                {
                    "s": shard_id,
                    "t": self.stage,
                    "keys": [retry.key for retry in retries],
                    "runs": [retry.runs for retry in retries],
                    "tried": [retry.tried_at for retry in retries],
                    "due": [retry.due_at for retry in retries],
                },
            )
