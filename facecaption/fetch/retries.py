"""The retry budget of fetch rows across runs.

A row that failed transiently (`retry_later`: a timeout, a refused connection, a DNS failure,
408/425/429/5xx, robots.txt answering 5xx) is fetched again by a later run (a refresh, `run
--retry-transient`), but only once its pause has passed: `fetch.row_retry_pause_s` after the
first run that tried it, doubling with each further one. The run that tries it for the
`fetch.row_max_runs`-th time and fails again makes it final: `gave_up`, its error naming the
last failure (`http_status` keeps the last status). Until a row is due, runs keep it as it is,
so a shard whose only unfinished rows are pausing has nothing to do (the stage records when
the first is due, and work selection reads that). A forced run (`run --force`) fetches every
unfinished row at once, the operator having asked; it counts as a run too.

Which rows are pausing, and since when, is kept in the state DB (`state.retries`); this
module only decides the numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from facecaption.fetch.web.downloader import retry_later
from facecaption.settings import FetchSettings
from facecaption.state.retries import RowRetry

GAVE_UP = "gave_up"
# The doubling stops growing here (a year); it would overflow a timedelta long before a
# budget of runs large enough to reach it ran out.
LONGEST_PAUSE = timedelta(days=365)


def pause_after(runs: int, limits: FetchSettings) -> timedelta:
    """How long a row waits after the `runs`-th run that failed to fetch it."""
    seconds = limits.row_retry_pause_s * 2.0 ** min(max(runs - 1, 0), 64)
    return timedelta(seconds=min(seconds, LONGEST_PAUSE.total_seconds()))


def pausing_rows(ledger: dict[int, RowRetry], now: datetime, forced: bool) -> set[int]:
    """The rows a run leaves as they are: those not due yet (none when forced)."""
    if forced:
        return set()
    return {row for row, retry in ledger.items() if retry.due_at > now}


def settle(
    records: Iterable[dict[str, Any]],
    tried: set[int],
    ledger: dict[int, RowRetry],
    limits: FetchSettings,
    now: datetime,
) -> list[RowRetry]:
    """After a run: every row it tried (`tried`) that failed transiently has used one more
    run of its budget; one that used the last becomes `gave_up` (its record is changed in
    place). Returns the rows still waiting for a later run: those, and the pausing ones the
    run left alone, as `ledger` had them."""
    waiting: list[RowRetry] = []
    for record in records:
        row = record["row"]
        if not retry_later(record["status"], record["http_status"]):
            continue
        if row not in tried and row in ledger:
            waiting.append(ledger[row])
            continue
        runs = ledger[row].runs + 1 if row in ledger else 1
        if runs >= limits.row_max_runs:
            last = f"{record['status']}: {record['error']}" if record["error"] else record["status"]
            record.update(status=GAVE_UP, error=f"after {runs} runs, the last {last}")
            continue
        waiting.append(RowRetry(row, runs, now, now + pause_after(runs, limits)))
    return waiting


def next_due(waiting: Iterable[RowRetry]) -> datetime | None:
    """When the first of the waiting rows is due (None: none waits)."""
    return min((retry.due_at for retry in waiting), default=None)
