"""The pipeline as one object over settings, state DB and artifact store.

This is the entry point the CLI, the Airflow tasks and the tests share: plan sources, choose
shards, run a stage on a shard, and report shard x stage status.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from facecaption.core.errors import PermanentError
from facecaption.core.runner import (
    RETRYABLE,
    StageOutcome,
    current_fingerprint,
    run_stage,
)
from facecaption.core.stage import StageInputError, stage_registry
from facecaption.core.store import ArtifactStore
from facecaption.plan.planner import PlanReport, plan_sources
from facecaption.settings import Settings
from facecaption.state import ShardState, StageState, UnknownShardError, open_state

WORK_STATUSES = ("all", "pending", "failed", "stale", "retryable", "work")


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


class Pipeline:
    def __init__(self, settings: Settings, state: ShardState, store: ArtifactStore) -> None:
        self.settings = settings
        self.state = state
        self.store = store

    @classmethod
    def open(cls, settings: Settings | None = None) -> Pipeline:
        settings = settings or Settings()
        store = ArtifactStore(settings.artifact_root, scratch_dir=settings.home_dir / "tmp")
        return cls(settings, open_state(settings), store)

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
        selection = self._choose(sources, shard_ids)
        if selection.plan_errors:
            raise PlanError(selection.plan_error_text())
        return selection.shard_ids

    def _choose(self, sources: list[str] | None, shard_ids: list[str] | None) -> WorkSelection:
        if shard_ids:
            for shard_id in shard_ids:
                self.state.get_shard(shard_id)
            return WorkSelection(list(dict.fromkeys(shard_ids)))
        if sources:
            report = self.plan(sources)
            return WorkSelection(report.shard_ids, dict(report.errors))
        return WorkSelection([shard.shard_id for shard in self.state.list_shards()])

    def select_work(
        self,
        sources: list[str] | None = None,
        shard_ids: list[str] | None = None,
        *,
        stages: list[str] | None = None,
        status: str = "all",
        max_shards: int | None = None,
    ) -> WorkSelection:
        """Shards (chosen as `select_shards` does, but a source that cannot be planned is
        reported in `plan_errors` instead of raised) with work in `stages` that matches
        `status`:

        all        every chosen shard
        pending    some stage not done yet (pending, running, failed)
        failed     some stage failed
        stale      some stage done, but its inputs, settings or model changed since
        retryable  some stage done with work to try again (fetch rows that timed out, ...)
        work       any of pending, stale or retryable: what a refresh runs
        """
        if status not in WORK_STATUSES:
            raise ValueError(f"status must be one of {', '.join(WORK_STATUSES)}")
        stages = stages or self.stage_names
        unknown = set(stages) - set(self.stage_names)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; known: {self.stage_names}")
        selection = self._choose(sources, shard_ids)
        chosen = selection.shard_ids
        if status != "all":
            states = {(s.shard_id, s.stage): s for s in self.state.stage_table(chosen)}
            shards = {shard.shard_id: shard for shard in self.state.list_shards()}
            registry = stage_registry()

            def stale(shard_id: str, stage: str, state: StageState) -> bool:
                try:
                    wanted = current_fingerprint(
                        registry[stage], shards[shard_id], self.settings, self.state
                    )
                except StageInputError:
                    return False  # its input is not done: the earlier stage is the stale one
                return wanted != state.fingerprint

            def matches(shard_id: str, stage: str, one: str) -> bool:
                state = states.get((shard_id, stage))
                current = state.status if state else "pending"
                if one == "work":
                    return any(
                        matches(shard_id, stage, s) for s in ("pending", "retryable", "stale")
                    )
                if one == "pending":
                    return current != "done"
                if one == "failed":
                    return current == "failed"
                if current != "done":
                    return False
                if one == "retryable":
                    return bool(state.counts.get(RETRYABLE, 0))
                return stale(shard_id, stage, state)

            chosen = [
                shard_id for shard_id in chosen
                if any(matches(shard_id, stage, status) for stage in stages)
            ]  # fmt: skip
        return WorkSelection(chosen[:max_shards] if max_shards else chosen, selection.plan_errors)

    def run(
        self, stage: str, shard_id: str, *, force: bool = False, retry_transient: bool = False
    ) -> StageOutcome:
        return run_stage(
            stage, shard_id, self.settings, self.state, self.store,
            force=force, retry_transient=retry_transient,
        )  # fmt: skip

    def status(self, shard_ids: list[str] | None = None) -> list[ShardStatusRow]:
        shards = self.state.list_shards()
        if shard_ids is not None:
            wanted = set(shard_ids)
            missing = wanted - {shard.shard_id for shard in shards}
            if missing:
                raise UnknownShardError(f"unknown shards: {sorted(missing)}")
            shards = [shard for shard in shards if shard.shard_id in wanted]
        by_key = {(s.shard_id, s.stage): s for s in self.state.stage_table(shard_ids)}
        return [
            ShardStatusRow(
                shard.shard_id,
                shard.source_uri.rsplit("/", 1)[-1],
                shard.num_rows,
                {
                    stage: by_key.get(
                        (shard.shard_id, stage), StageState(shard.shard_id, stage, "pending")
                    )
                    for stage in self.stage_names
                },
            )
            for shard in shards
        ]


@dataclass(frozen=True)
class ShardRun:
    """What running some stages on one shard came to: outcomes, and the error that stopped it."""

    shard_id: str
    outcomes: list[StageOutcome]
    error: str | None = None


def run_shard(
    settings: Settings, shard_id: str, stages: list[str], force: bool,
    retry_transient: bool = False,
) -> ShardRun:  # fmt: skip
    """Run `stages` in order on one shard, stopping at the first failure (recorded in the DB)."""
    outcomes = []
    with Pipeline.open(settings) as pipeline:
        for stage in stages:
            try:
                outcomes.append(
                    pipeline.run(stage, shard_id, force=force, retry_transient=retry_transient)
                )
            except Exception as error:  # the state DB has the failure; report it and stop
                return ShardRun(shard_id, outcomes, f"{stage}: {type(error).__name__}: {error}")
    return ShardRun(shard_id, outcomes)


def run_shards(
    settings: Settings,
    shard_ids: list[str],
    stages: list[str],
    *,
    force: bool = False,
    retry_transient: bool = False,
    jobs: int = 1,
) -> Iterator[ShardRun]:
    """Run stages on shards, `jobs` shards at a time in separate processes (one per core is
    the usual choice: each process downloads with many connections of its own)."""
    if jobs <= 1:
        for shard_id in shard_ids:
            yield run_shard(settings, shard_id, stages, force, retry_transient)
        return
    # spawn: a forked child would inherit the parent's DB connections and event loop state
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(run_shard, settings, shard_id, stages, force) for shard_id in shard_ids
        ]
        for future in as_completed(futures):
            yield future.result()


def status_totals(rows: list[ShardStatusRow]) -> dict[str, dict[str, Any]]:
    """Per stage: shards by status and the sum of each count."""
    totals: dict[str, dict[str, Any]] = {}
    for row in rows:
        for stage, state in row.stages.items():
            entry = totals.setdefault(stage, {"shards": Counter(), "counts": Counter()})
            entry["shards"][state.status] += 1
            for name, value in state.counts.items():
                if isinstance(value, int):
                    entry["counts"][name] += value
    return {
        stage: {"shards": dict(entry["shards"]), "counts": dict(entry["counts"])}
        for stage, entry in totals.items()
    }
