"""Running one stage on one shard with its state kept in Postgres.

The order of events is what makes runs safe to kill and repeat:
1. take the (shard, stage) lock, or fail fast with ShardBusyError;
2. compute the fingerprint (stage version + inputs + output-affecting settings); if the stage
   is `done` with the same fingerprint and its artifacts exist, do nothing (unless forced, or
   asked to retry the `retryable` work it reported);
   a forced run may reuse what is final in those artifacts;
3. mark a new attempt `running`, remove temporary files a killed attempt left behind;
4. run the stage, which publishes its artifacts atomically;
5. only then mark the attempt `done` with counts, warnings, artifact checksums and the
   fingerprint, which from then on describes the artifacts.
An exception marks the attempt `failed` with its message and is raised again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from facecaption.core.fingerprints import LiveStageInputs, current_fingerprint
from facecaption.core.stage import Stage, StageContext, stage_registry
from facecaption.core.store import ArtifactStore
from facecaption.settings import Settings
from facecaption.state import ShardState
from facecaption.state.dedup import ImageHashIndex
from facecaption.state.shards import worker_name
from facecaption.state.takedowns import TakedownIndex

RETRYABLE = "retryable"  # a count a stage reports for work a later run should try again


@dataclass(frozen=True)
class StageOutcome:
    shard_id: str
    stage: str
    status: str  # "done" (ran now) or "skipped" (already done with this fingerprint)
    attempt: int
    counts: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What goes into XCom: ids and counts only."""
        return {
            "shard_id": self.shard_id,
            "stage": self.stage,
            "status": self.status,
            "attempt": self.attempt,
            "counts": self.counts,
        }


def get_stage(name: str) -> Stage:
    stages = stage_registry()
    if name not in stages:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(stages)}")
    return stages[name]


def run_stage(
    stage_name: str,
    shard_id: str,
    settings: Settings,
    state: ShardState,
    store: ArtifactStore,
    *,
    force: bool = False,
    fresh: bool = False,
    retry_transient: bool = False,
) -> StageOutcome:
    """Run a stage on a shard unless it is done with the same fingerprint.

    `force` runs it anyway; the stage may then keep what is final in its earlier outputs
    (the fetch stage re-tries only transient failures). `retry_transient` runs it only when it
    left `retryable` work (what a refresh does). `fresh` also ignores earlier outputs.
    """
    stage = get_stage(stage_name)
    shard = state.get_shard(shard_id)
    with state.claim(shard_id, stage.name):
        current = state.get_stage(shard_id, stage.name)
        wanted = current_fingerprint(stage, shard, settings, LiveStageInputs(state))
        reusable = (
            current.fingerprint == wanted
            and bool(current.artifacts)
            and all(store.exists(store.shard_path(shard_id, n)) for n in current.artifacts)
        )
        # With retry_transient, a stage that left retryable work (fetch rows that timed out,
        # ...) is not up to date.
        retry = retry_transient and bool(current.counts.get(RETRYABLE, 0))
        up_to_date = reusable and not retry
        if up_to_date and current.status == "done" and not force:
            return StageOutcome(
                shard_id, stage.name, "skipped", current.attempt, current.counts, current.artifacts
            )
        attempt = state.mark_running(shard_id, stage.name, wanted, worker_name())
        context = StageContext(
            shard=shard,
            settings=settings,
            store=store,
            dedup=ImageHashIndex(state.engine),
            takedowns=TakedownIndex(state.engine),
            fingerprint=wanted,
            previous=current if reusable and not fresh else None,
        )
        try:
            store.remove_partials(shard_id)
            result = stage.run(context)
        except BaseException as error:
            state.mark_failed(shard_id, stage.name, attempt, f"{type(error).__name__}: {error}")
            raise
        artifacts = {name: ref.as_json() for name, ref in result.artifacts.items()}
        state.mark_done(
            shard_id, stage.name, attempt, result.counts, artifacts, wanted, result.warnings,
            stats=result.stats,
        )  # fmt: skip
        return StageOutcome(
            shard_id, stage.name, "done", attempt, result.counts, artifacts, result.warnings
        )
