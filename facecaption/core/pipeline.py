"""The pipeline as one object over settings, state DB and artifact store.

This is the entry point the CLI, the Airflow tasks and the tests share: plan sources, choose
shards, run a stage on a shard, and report shard x stage status.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from facecaption.core.bulk import collector_paused
from facecaption.core.errors import PermanentError
from facecaption.core.fingerprints import Fingerprints
from facecaption.core.names import WORK_STATUSES
from facecaption.core.progress import ProgressEvent, ProgressSink
from facecaption.core.redaction import redact_text
from facecaption.core.runner import StageOutcome, retry_due, run_stage
from facecaption.core.stage import StageInputError, stage_registry
from facecaption.core.store import ArtifactStore
from facecaption.plan.planner import PlanReport, plan_sources
from facecaption.settings import Settings
from facecaption.state import (
    Shard,
    ShardBusyError,
    ShardState,
    StageState,
    UnknownShardError,
    open_state,
)
from facecaption.state.shards import STATUSES, ShardFilter

PROGRESS_POLL_S = 0.2  # how often progress from worker processes is passed on


class PlanError(PermanentError, ValueError):
    """One or more sources could not be planned."""


@dataclass(frozen=True)
class WorkSelection:
    """The shards chosen for a run, and the source files that could not be planned.

    A bad file never stops the others: its shards are simply not there, and `plan_errors`
    (file or argument -> why) says so. A run that had plan errors did not do all it was asked
    to, whatever happened to the shards.
    """

    shard_ids: list[str]
    plan_errors: dict[str, str] = field(default_factory=dict)

    def plan_error_text(self) -> str:
        return "; ".join(self.plan_errors.values())


@dataclass(frozen=True)
class ShardStatusRow:
    shard_id: str
    source: str
    rows: int
    stages: dict[str, StageState]


@dataclass(frozen=True)
class StatusPage:
    """One page of shard status: its rows, how many shards the filter matched and how many
    are registered, and per stage over all shards: shards by status and summed counts."""

    rows: list[ShardStatusRow]
    matched: int
    registered: int
    totals: dict[str, dict[str, Any]]


class Pipeline:
    def __init__(self, settings: Settings, state: ShardState, store: ArtifactStore) -> None:
        self.settings = settings
        self.state = state
        self.store = store

    @classmethod
    def open(cls, settings: Settings | None = None, state: ShardState | None = None) -> Pipeline:
        """A pipeline on `settings` (read from the environment when None), connected to the
        state DB, or sharing `state`'s connections (which `close` then disposes of: a caller
        sharing them does not close)."""
        settings = settings or Settings()
        store = ArtifactStore(settings.artifact_root, scratch_dir=settings.home_dir / "tmp")
        return cls(settings, state or open_state(settings), store)

    def close(self) -> None:
        self.state.engine.dispose()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def stage_names(self) -> list[str]:
        return list(stage_registry())

    def plan(self, sources: list[str]) -> PlanReport:
        return plan_sources(sources, self.settings, self.state)

    def select_shards(
        self, sources: list[str] | None = None, shard_ids: list[str] | None = None
    ) -> list[str]:
        """Explicit shard ids (checked to exist), else the shards of `sources` (planned now),
        else every registered shard. All or nothing: PlanError when a source could not be
        planned (`select_work` plans what it can and reports the rest)."""
        shards, plan_errors = self._chosen_shards(sources, shard_ids)
        if plan_errors:
            raise PlanError(WorkSelection([], plan_errors).plan_error_text())
        return [shard.shard_id for shard in shards]

    def _chosen_shards(
        self, sources: list[str] | None = None, shard_ids: list[str] | None = None
    ) -> tuple[list[Shard], dict[str, str]]:
        """The chosen shards in planning order, and the sources that could not be planned."""
        if shard_ids:
            wanted = list(dict.fromkeys(shard_ids))
            found = {shard.shard_id: shard for shard in self.state.list_shards(shard_ids=wanted)}
            missing = [shard_id for shard_id in wanted if shard_id not in found]
            if missing:
                raise UnknownShardError(
                    f"no shard {missing[0]!r} is registered; run `facecaption plan`"
                    + (f" ({len(missing)} unknown shard ids)" if len(missing) > 1 else "")
                )
            return [found[shard_id] for shard_id in wanted], {}
        if sources:
            report = self.plan(sources)
            planned = {source.source_id for source in report.sources}
            by_id = {s.shard_id: s for s in self.state.list_shards(source_ids=list(planned))}
            shards = [by_id[shard_id] for shard_id in dict.fromkeys(report.shard_ids)]
            return shards, dict(report.errors)
        return self.state.list_shards(), {}

    def select_work(
        self,
        sources: list[str] | None = None,
        shard_ids: list[str] | None = None,
        *,
        stages: list[str] | None = None,
        status: str = "all",
        max_shards: int | None = None,
        after: str | None = None,
    ) -> WorkSelection:
        """Shards (chosen as `select_shards` does, but a source that cannot be planned is
        reported in `plan_errors` instead of raised) with work in `stages` that matches
        `status`:

        all        every chosen shard
        pending    some stage not done yet (pending, running, failed)
        failed     some stage failed
        stale      some stage done, but its inputs, settings or model changed since
        retryable  some stage done with work to try again that is due (fetch rows that timed
                   out, ... whose pause between runs has passed)
        work       any of pending, stale or retryable: what a refresh runs

        At most `max_shards`, and only shards after the shard id `after` in the chosen order:
        a caller working through more shards than one run takes (Airflow's max_map_length)
        passes the last shard of one chunk as `after` of the next. The query count does not
        grow with the shards: their stages and takedown matches are read in one query each.
        """
        if status not in WORK_STATUSES:
            raise ValueError(f"status must be one of {', '.join(WORK_STATUSES)}")
        stages = stages or self.stage_names
        unknown = set(stages) - set(self.stage_names)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; known: {self.stage_names}")
        chosen, plan_errors = self._chosen_shards(sources, shard_ids)
        if after is not None:
            position = next((i for i, s in enumerate(chosen) if s.shard_id == after), None)
            if position is None:
                raise UnknownShardError(f"shard {after!r} (after) is not among the chosen shards")
            chosen = chosen[position + 1 :]
        if status == "all":
            return WorkSelection([s.shard_id for s in chosen[: max_shards or None]], plan_errors)
        everything = not (sources or shard_ids or after)
        with collector_paused():  # what it reads is gone before the collector runs again
            selected = self._with_work(chosen, everything, stages, status, max_shards)
        return WorkSelection(selected, plan_errors)

    def _with_work(
        self, chosen: list[Shard], everything: bool, stages: list[str], status: str,
        max_shards: int | None,
    ) -> list[str]:  # fmt: skip
        """The ids of the `chosen` shards (`everything`: all registered) with work in
        `stages` that matches `status` (not `all`), at most `max_shards`."""
        fingerprints = Fingerprints.prefetch(
            self.settings, self.state, stage_registry(),
            None if everything else [shard.shard_id for shard in chosen],
            takedowns="export" in stages and status in ("stale", "work"),
            epochs="fetch" in stages and status in ("stale", "work"),
        )  # fmt: skip
        selected: list[str] = []
        for shard in chosen:
            if max_shards and len(selected) >= max_shards:
                break
            if any(_has_work(fingerprints, shard, stage, status) for stage in stages):
                selected.append(shard.shard_id)
        return selected

    def run(
        self,
        stage: str,
        shard_id: str,
        *,
        force: bool = False,
        fresh: bool = False,
        retry_transient: bool = False,
        wait_s: float = 0,
        progress: ProgressSink | None = None,
    ) -> StageOutcome:
        """Run one stage on one shard (`facecaption.core.runner.run_stage`: `force` keeps what
        is final in the stage's earlier outputs, `force` and `fresh` together redo it all)."""
        return run_stage(
            stage, shard_id, self.settings, self.state, self.store, force=force, fresh=fresh,
            retry_transient=retry_transient, wait_s=wait_s, progress=progress,
        )  # fmt: skip

    def status(
        self,
        shard_ids: list[str] | None = None,
        *,
        status: str = "",
        stage: str = "",
        contains: str = "",
        limit: int | None = None,
        offset: int = 0,
        artifacts: bool = True,
    ) -> list[ShardStatusRow]:
        """Shards x stages, in planning order: all shards, or `shard_ids` (each must exist),
        or those whose id contains `contains` and that have a stage (`stage`, or any) in
        `status`; `limit` and `offset` page through them. Three queries whatever the number
        of shards. Without `artifacts` the stages' artifacts are left out (a table of counts
        needs none; decoding them is a third of the work)."""
        return self.status_page(
            shard_ids, status=status, stage=stage, contains=contains, limit=limit, offset=offset,
            totals=False, artifacts=artifacts,
        ).rows  # fmt: skip

    def status_page(
        self,
        shard_ids: list[str] | None = None,
        *,
        status: str = "",
        stage: str = "",
        contains: str = "",
        limit: int | None = None,
        offset: int = 0,
        totals: bool = True,
        artifacts: bool = True,
    ) -> StatusPage:
        """`status` plus how many shards match the filter and are registered, and (with
        `totals`) each stage's shards by status and summed counts over all shards, from SQL
        aggregates (a page of the shard view; five queries)."""
        if status and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        names = self.stage_names
        if stage and stage not in names:
            raise ValueError(f"unknown stage {stage!r}; known: {names}")
        shard_filter = ShardFilter(
            shard_ids=tuple(dict.fromkeys(shard_ids)) if shard_ids is not None else None,
            contains=contains,
            status=status,
            stages=(stage,) if stage else tuple(names),
        )
        shards, matched, registered = self.state.filter_shards(shard_filter, limit, offset)
        if shard_ids is not None:
            missing = set(shard_filter.shard_ids or ()) - {s.shard_id for s in shards}
            if missing and not (status or contains or limit is not None or offset):
                raise UnknownShardError(f"unknown shards: {sorted(missing)}")
        everything = shard_ids is None and not (status or contains or limit or offset)
        with collector_paused():
            by_key = {
                (s.shard_id, s.stage): s
                for s in self.state.stage_table(
                    None if everything else [shard.shard_id for shard in shards],
                    artifacts=artifacts,
                )
            }
            rows = [
                ShardStatusRow(
                    shard.shard_id,
                    shard.source_uri.rsplit("/", 1)[-1],
                    shard.num_rows,
                    {
                        name: by_key.get((shard.shard_id, name))
                        or StageState(shard.shard_id, name, "pending")
                        for name in names
                    },
                )
                for shard in shards
            ]
        stage_totals = self.state.stage_totals(registered, names) if totals else {}
        return StatusPage(rows, matched, registered, stage_totals)


def _has_work(fingerprints: Fingerprints, shard: Shard, stage: str, status: str) -> bool:
    """Whether `stage` of `shard` matches a work status (see `Pipeline.select_work`)."""
    state = fingerprints.inputs.find(shard.shard_id, stage)
    current = state.status if state else "pending"
    if status == "failed":
        return current == "failed"
    if current != "done" or state is None:
        return status in ("pending", "work")  # neither retryable nor stale before it is done
    if status == "pending":
        return False
    if status != "stale" and retry_due(state):
        return True  # retryable, or work
    if status == "retryable":
        return False
    try:
        wanted = fingerprints.current(stage, shard)
    except StageInputError:
        return False  # its input is not done: the earlier stage is the stale one
    return wanted != state.fingerprint


def chunked(shard_ids: list[str], size: int) -> list[list[str]]:
    """`shard_ids` in consecutive chunks of at most `size` (a run's or a mapped task's
    share of a selection larger than Airflow's max_map_length)."""
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    return [shard_ids[start : start + size] for start in range(0, len(shard_ids), size)]


@dataclass(frozen=True)
class ShardRun:
    """What running some stages on one shard came to: outcomes, and the error that stopped it,
    or the stage another worker held (`busy`; the stages from it on did not run here)."""

    shard_id: str
    outcomes: list[StageOutcome]
    error: str | None = None
    busy: str | None = None
    waited: bool = False  # this was the second try, after waiting for the other worker

    @property
    def done(self) -> bool:
        return self.error is None and self.busy is None


def run_shard(
    settings: Settings, shard_id: str, stages: list[str], force: bool,
    retry_transient: bool = False, wait_s: float = 0, progress: ProgressSink | None = None,
    fresh: bool = False,
) -> ShardRun:  # fmt: skip
    """Run `stages` in order on one shard, stopping at the first failure (recorded in the DB)
    or at a stage another worker holds (after waiting `wait_s` for it). `progress` gets
    running counts and an event at the end of each stage. `fresh` (with `force`) redoes
    every row and face, the final ones included."""
    outcomes = []
    with Pipeline.open(settings) as pipeline:
        for stage in stages:
            try:
                outcome = pipeline.run(
                    stage, shard_id, force=force, fresh=fresh, retry_transient=retry_transient,
                    wait_s=wait_s, progress=progress,
                )  # fmt: skip
            except ShardBusyError as busy:  # running elsewhere, or taken over from us
                if progress:
                    progress(ProgressEvent(shard_id, stage, {}, status="busy", error=str(busy)))
                return ShardRun(shard_id, outcomes, busy=f"{stage}: {busy}", waited=wait_s > 0)
            except Exception as error:  # the state DB has the failure; report it and stop
                message = redact_text(f"{type(error).__name__}: {error}")
                if progress:
                    progress(ProgressEvent(shard_id, stage, {}, status="failed", error=message))
                return ShardRun(shard_id, outcomes, f"{stage}: {message}")
            outcomes.append(outcome)
            if progress:
                progress(
                    ProgressEvent(
                        shard_id, stage, outcome.counts, outcome.status,
                        warnings=outcome.warnings,
                    )
                )  # fmt: skip
    return ShardRun(shard_id, outcomes, waited=wait_s > 0)


def run_shards(
    settings: Settings,
    shard_ids: list[str],
    stages: list[str],
    *,
    force: bool = False,
    retry_transient: bool = False,
    jobs: int = 1,
    progress: ProgressSink | None = None,
    fresh: bool = False,
) -> Iterator[ShardRun]:
    """Run stages on shards, `jobs` shards at a time in separate processes (one per core is
    the usual choice: each process downloads with many connections of its own). `progress`
    gets every shard's events, in this process, as they happen.

    A shard whose stage another worker holds is skipped and reported (`busy`); once the others
    are done, each skipped shard is tried again from that stage, waiting up to
    `settings.busy_wait_s` for the other worker (a stage it finished is then skipped here).
    Each shard's last ShardRun says whether its chosen work is done."""
    busy: dict[str, list[str]] = {}
    first = _run_pass(
        settings, shard_ids, stages, force, retry_transient, jobs, {}, progress, fresh
    )
    for shard_run in first:
        if shard_run.busy:
            busy[shard_run.shard_id] = stages[len(shard_run.outcomes) :]
        yield shard_run
    if busy and settings.busy_wait_s > 0:
        yield from _run_pass(
            settings, list(busy), stages, force, retry_transient, jobs, busy, progress, fresh
        )


def _run_pass(
    settings: Settings,
    shard_ids: list[str],
    stages: list[str],
    force: bool,
    retry_transient: bool,
    jobs: int,
    remaining: dict[str, list[str]],
    progress: ProgressSink | None = None,
    fresh: bool = False,
) -> Iterator[ShardRun]:
    """One pass over `shard_ids`; with `remaining` (shard -> stages left), the second one,
    which waits for busy stages."""
    wait_s = settings.busy_wait_s if remaining else 0
    calls = [
        (settings, shard_id, remaining.get(shard_id, stages), force, retry_transient, wait_s)
        for shard_id in shard_ids
    ]
    if jobs <= 1:
        for call in calls:
            yield run_shard(*call, progress, fresh=fresh)
        return
    # spawn: a forked child would inherit the parent's DB connections and event loop state
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(jobs, mp_context=context) as pool:
        events = manager.Queue() if progress else None

        def drain() -> None:
            while events is not None and not events.empty():
                progress(events.get())

        pending = {
            pool.submit(run_shard, *call, events.put if events is not None else None, fresh=fresh)
            for call in calls
        }
        while pending:
            finished, pending = wait(pending, timeout=PROGRESS_POLL_S, return_when=FIRST_COMPLETED)
            drain()
            for future in finished:
                yield future.result()
        drain()


def status_totals(rows: list[ShardStatusRow]) -> dict[str, dict[str, Any]]:
    """Per stage: shards by status and the sum of each count."""
    totals: dict[str, tuple[dict[str, int], dict[str, Any]]] = {}
    for row in rows:
        for stage, state in row.stages.items():
            entry = totals.get(stage)
            if entry is None:
                entry = totals[stage] = ({}, {})
            shards, counts = entry
            shards[state.status] = shards.get(state.status, 0) + 1
            for name, value in state.counts.items():
                if isinstance(value, int):
                    counts[name] = counts.get(name, 0) + value
    return {
        stage: {"shards": shards, "counts": counts} for stage, (shards, counts) in totals.items()
    }
