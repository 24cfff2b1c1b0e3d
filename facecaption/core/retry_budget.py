"""The retry budget across runs that stages give their rows which failed transiently (fetch:
a URL that timed out or answered 5xx; caption: a face whose LLM request met a server error).

Such a row is tried again by a later run (a refresh, `run --retry-transient`), but only once
its pause has passed: `pause_s` after the first run that tried it, doubling with each further
one. The run that tries it for the `max_runs`-th time and fails again spends the budget: the
stage makes the row final (`gave_up`, with its last error). Until a row is due, runs keep it
as it is, so a shard whose only unfinished rows are pausing has nothing to do: the stage
records when the first is due (`StageResult.retry_at`), and work selection reads that. A
forced run (`run --force`) tries every unfinished row at once, the operator having asked; it
counts as a run too.

A stage names its rows by a text key (fetch: the row number; caption: the face id); which
keys are pausing, and since when, is kept in the state DB (`facecaption.state.retries`). This
module only decides the numbers; what "transient" and "gave up" mean is the stage's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from facecaption.state.retries import RowRetry

# The doubling stops growing here (a year); it would overflow a timedelta long before a
# budget of runs large enough to reach it ran out.
LONGEST_PAUSE = timedelta(days=365)


@dataclass(frozen=True)
class RetryBudget:
    max_runs: int  # runs that may try a row failing transiently; the last makes it final
    pause_s: float  # the wait after the first of them; doubles with each further run

    def pause_after(self, runs: int) -> timedelta:
        """How long a row waits after the `runs`-th run that failed it."""
        seconds = self.pause_s * 2.0 ** min(max(runs - 1, 0), 64)
        return timedelta(seconds=min(seconds, LONGEST_PAUSE.total_seconds()))

    @staticmethod
    def pausing(ledger: Mapping[str, RowRetry], now: datetime, forced: bool) -> set[str]:
        """The keys a run leaves as they are: those not due yet (none when forced)."""
        if forced:
            return set()
        return {key for key, retry in ledger.items() if retry.due_at > now}

    def settle(
        self,
        failing: Iterable[str],
        tried: set[str],
        ledger: Mapping[str, RowRetry],
        now: datetime,
    ) -> tuple[list[RowRetry], list[RowRetry]]:
        """After a run, given the keys still failing transiently in its outputs (`failing`)
        and those it tried (`tried`): each tried one has used one more run of its budget.
        Returns (waiting, spent): the rows a later run may try (those, and the pausing ones
        the run left alone, as `ledger` had them), and those whose budget this run spent,
        which the stage makes final."""
        waiting: list[RowRetry] = []
        spent: list[RowRetry] = []
        for key in failing:
            if key not in tried and key in ledger:
                waiting.append(ledger[key])
                continue
            runs = ledger[key].runs + 1 if key in ledger else 1
            retry = RowRetry(key, runs, now, now + self.pause_after(runs))
            (spent if runs >= self.max_runs else waiting).append(retry)
        return waiting, spent


def next_due(waiting: Iterable[RowRetry]) -> datetime | None:
    """When the first of the waiting rows is due (None: none waits)."""
    return min((retry.due_at for retry in waiting), default=None)
