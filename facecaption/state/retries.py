"""The fetch rows that failed transiently and that a later run may try again, kept across runs
in `fetch_row_retries`: per (shard, row) how many runs tried it, when the last did, and when
the next may. The fetch stage reads a shard's rows before it runs and replaces them with what
is still pausing after it published (`facecaption.fetch.retries` decides the numbers). One
query to read, one transaction to replace, whatever the number of rows.
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

    row: int
    runs: int  # runs that fetched it and got a transient failure
    tried_at: datetime  # when the last of them did
    due_at: datetime  # from when a run may fetch it again


class RowRetryLedger:
    """`fetch_row_retries` over one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def rows(self, shard_id: str) -> dict[int, RowRetry]:
        """The shard's rows waiting for another run, by row number."""
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.text(
                    "SELECT row, runs, tried_at, due_at FROM fetch_row_retries WHERE shard_id = :s"
                ),
                {"s": shard_id},
            )
            return {r.row: RowRetry(r.row, r.runs, r.tried_at, r.due_at) for r in found}

    def replace(self, shard_id: str, retries: Sequence[RowRetry]) -> None:
        """Make `retries` the shard's rows (rows that became final leave)."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.text("DELETE FROM fetch_row_retries WHERE shard_id = :s"), {"s": shard_id}
            )
            if not retries:
                return
            conn.execute(
                sa.text(
                    "INSERT INTO fetch_row_retries (shard_id, row, runs, tried_at, due_at)"
                    " SELECT :s, r, n, t, d FROM unnest(CAST(:rows AS bigint[]),"
                    " CAST(:runs AS integer[]), CAST(:tried AS timestamptz[]),"
                    " CAST(:due AS timestamptz[])) AS x(r, n, t, d)"
                ),
                {
                    "s": shard_id,
                    "rows": [retry.row for retry in retries],
                    "runs": [retry.runs for retry in retries],
                    "tried": [retry.tried_at for retry in retries],
                    "due": [retry.due_at for retry in retries],
                },
            )
