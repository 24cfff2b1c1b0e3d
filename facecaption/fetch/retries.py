"""The retry budget of fetch rows across runs (`facecaption.core.retry_budget`: pauses that
double between runs, then final).

A row that failed transiently (`retry_later`: a timeout, a refused connection, a DNS failure,
408/425/429/5xx, robots.txt answering 5xx) is fetched again by a later run once its pause has
passed (`fetch.row_retry_pause_s`, doubling with each run). The run that tries it for the
`fetch.row_max_runs`-th time and fails again makes it final: `gave_up`, its error naming the
last failure (`http_status` keeps the last status). Rows are keyed by their row number.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from facecaption.core.retry_budget import RetryBudget
from facecaption.fetch.web.downloader import retry_later
from facecaption.settings import FetchSettings
from facecaption.state.retries import RowRetry

GAVE_UP = "gave_up"


def row_budget(limits: FetchSettings) -> RetryBudget:
    return RetryBudget(limits.row_max_runs, limits.row_retry_pause_s)


def settle(
    records: Iterable[dict[str, Any]],
    tried: set[int],
    ledger: dict[str, RowRetry],
    limits: FetchSettings,
    now: datetime,
) -> list[RowRetry]:
    """After a run: every row it tried (`tried`) that failed transiently has used one more
    run of its budget; one that used the last becomes `gave_up` (its record is changed in
    place). Returns the rows still waiting for a later run."""
    failing = {
        str(record["row"]): record
        for record in records
        if retry_later(record["status"], record["http_status"])
    }
    waiting, spent = row_budget(limits).settle(failing, {str(row) for row in tried}, ledger, now)
    for retry in spent:
        record = failing[retry.key]
        last = f"{record['status']}: {record['error']}" if record["error"] else record["status"]
        record.update(status=GAVE_UP, error=f"after {retry.runs} runs, the last {last}")
    return waiting
