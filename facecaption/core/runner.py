"""Running one stage on one shard with its state kept in Postgres.

The order of events is what makes runs safe to kill and repeat:
1. take the (shard, stage) lock, or fail with ShardBusyError (at once, or after `wait_s`);
2. compute the fingerprint (stage version + inputs + output-affecting settings); if the stage
   is `done` with the same fingerprint and its artifacts are there at their recorded sizes,
   do nothing (unless forced, or asked to retry the `retryable` work it reported and that
   work is due: its `retry_at` has passed);
   a re-run may reuse what is final in those artifacts when its inputs are the same, apart
   from the ones decided across shards;
3. mark a new attempt `running` (its number is the fencing token), remove the temporary
   files this stage's earlier attempts left behind (never another stage's);
4. run the stage, which publishes its artifacts atomically, each under the attempt's fence:
   a worker that lost its lock to a newer attempt publishes nothing (AttemptTakenOverError);
5. only then mark the attempt `done` with counts, warnings, artifact checksums, the
   fingerprint and its inputs, which from then on describe the artifacts.
An exception marks the attempt `failed` with its message and is raised again; an attempt that
was taken over records its failure in the history and leaves the current row alone. One raised
in step 2 (an input stage not done, a model not installed) starts no attempt: it is kept as the
row's last error (`record_refusal`), so the shard view can say why the stage did not run.
Errors are stored with credentials masked (`redact_text`: URL userinfo, auth headers, keys).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import sqlalchemy as sa

from facecaption.core.fingerprints import LiveStageInputs, current_inputs, fingerprint
from facecaption.core.progress import ProgressSink, Throttled
from facecaption.core.stage import Stage, StageContext, stage_registry
from facecaption.core.store import ArtifactStore
from facecaption.settings import Settings
from facecaption.state import ShardState
from facecaption.state.dedup import ImageHashIndex
from facecaption.state.hostrates import HostRateStore
from facecaption.state.retries import RowRetryLedger
from facecaption.state.shards import StageState, worker_name
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


def as_recorded(inputs: dict[str, Any]) -> dict[str, Any]:
    """Fingerprint inputs as the state DB stores them (JSON)."""
    return json.loads(json.dumps(inputs, sort_keys=True, default=str))


def same_apart_from_cross_shard(stage: Stage, state: StageState, inputs: dict[str, Any]) -> bool:
    """Whether `state`'s outputs were made from `inputs`, apart from the stage's
    `cross_shard_inputs` (then a re-run may keep what is final in them)."""
    own = {k: v for k, v in inputs.items() if k not in stage.cross_shard_inputs}
    if state.inputs is None:  # recorded before inputs were kept: compare fingerprints
        return state.fingerprint == fingerprint(stage, own)
    if fingerprint(stage, state.inputs) != state.fingerprint:
        return False  # made by another version of the stage
    recorded = {k: v for k, v in state.inputs.items() if k not in stage.cross_shard_inputs}
    return recorded == as_recorded(own)


def artifacts_intact(store: ArtifactStore, shard_id: str, artifacts: dict[str, Any]) -> bool:
    """Every recorded artifact is there with its recorded size (a cheap check: no reading)."""
    return bool(artifacts) and all(
        store.size(store.shard_path(shard_id, name)) == ref["bytes"]
        for name, ref in artifacts.items()
    )


def retry_due(state: StageState, now: datetime | None = None) -> bool:
    """Whether the stage left `retryable` work that is due now (its `retry_at` has passed)."""
    if not state.counts.get(RETRYABLE, 0):
        return False
    return state.retry_at is None or state.retry_at <= (now or datetime.now(UTC))


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
    wait_s: float = 0,
    progress: ProgressSink | None = None,
) -> StageOutcome:
    """Run a stage on a shard unless it is done with the same fingerprint.

    `force` runs it anyway; the stage may then keep what is final in its earlier outputs
    (fetch and caption try again only their transient failures). `retry_transient` runs it
    only when it left `retryable` work that is due (what a refresh does). `fresh` also
    ignores earlier outputs.
    `wait_s`: how long to wait for another worker that holds this shard's stage.
    `progress` gets the stage's running counts as it goes.
    """
    stage = get_stage(stage_name)
    shard = state.get_shard(shard_id)
    with state.claim(shard_id, stage.name, wait_s=wait_s):
        current = state.get_stage(shard_id, stage.name)
        try:
            inputs = current_inputs(stage, shard, settings, LiveStageInputs(state))
        except Exception as error:
            # No attempt starts, so nothing else would tell the shard view why.
            _record_refusal(state, shard_id, stage.name, error)
            raise
        wanted = fingerprint(stage, inputs)
        intact = artifacts_intact(store, shard_id, current.artifacts)
        # With retry_transient, a stage that left retryable work that is due (fetch rows that
        # timed out, caption faces whose LLM server failed, ...) is not up to date.
        retry = retry_transient and retry_due(current)
        up_to_date = intact and current.fingerprint == wanted and not retry
        if up_to_date and current.status == "done" and not force:
            return StageOutcome(
                shard_id, stage.name, "skipped", current.attempt, current.counts, current.artifacts
            )
        reusable = intact and same_apart_from_cross_shard(stage, current, inputs)
        attempt = state.mark_running(shard_id, stage.name, wanted, worker_name())
        fence = partial(state.hold_attempt, shard_id, stage.name, attempt)
        owned = store.owned_by(stage.name, attempt, fence)
        context = StageContext(
            shard=shard,
            settings=settings,
            store=owned,
            dedup=ImageHashIndex(state.engine, (stage.name, attempt)),
            takedowns=TakedownIndex(state.engine),
            row_retries=RowRetryLedger(state.engine, stage.name),
            forced=force,
            host_rates=HostRateStore(state.engine),
            fingerprint=wanted,
            previous=current if reusable and not fresh else None,
            inputs=inputs,
            **({"progress": Throttled(progress, shard_id, stage.name)} if progress else {}),
        )
        try:
            store.remove_partials(
                store.shard_folder(shard_id), stage.name, attempt, stage.artifact_names
            )
            result = stage.run(context)
            artifacts = {name: ref.as_json() for name, ref in result.artifacts.items()}
            state.mark_done(
                shard_id, stage.name, attempt, result.counts, artifacts, wanted, result.warnings,
                as_recorded(inputs), stats=result.stats, retry_at=result.retry_at,
            )  # fmt: skip
        except BaseException as error:
            _record_failure(state, shard_id, stage.name, attempt, error)
            raise
        return StageOutcome(
            shard_id, stage.name, "done", attempt, result.counts, artifacts, result.warnings
        )


def _record_refusal(state: ShardState, shard_id: str, stage: str, error: Exception) -> None:
    """Record why the stage did not start."""
    _record(error, lambda text: state.record_refusal(shard_id, stage, text))


def _record_failure(
    state: ShardState, shard_id: str, stage: str, attempt: int, error: BaseException
) -> None:
    """Record the attempt's own error."""
    _record(error, lambda text: state.mark_failed(shard_id, stage, attempt, text))


def _record(error: BaseException, write: Callable[[str], None]) -> None:
    """Write `error` to the state DB; if even that fails (the state DB is away), say so on the
    error that is raised, never in place of it."""
    try:
        write(f"{type(error).__name__}: {error}")
    except sa.exc.DBAPIError as unrecorded:
        error.add_note(f"(not recorded in the state DB: {type(unrecorded).__name__})")
