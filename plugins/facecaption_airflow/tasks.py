"""The per-shard part every facecaption DAG shares: one mapped task group per shard
(fetch -> detect -> attribute -> caption -> export; with `airflow.gpu_stages_in_one_task`,
fetch -> gpu -> [caption] -> export), a summary, the release (files,
manifest, report), and the check that fails the run when a shard or the plan failed
(see `failures`). DAG files supply the shard ids."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Param, chain, task, task_group

from facecaption.settings import Settings
from facecaption_airflow.chunks import NextChunkOperator, take_chunk
from facecaption_airflow.failures import (
    CHECK_TASK_ID,
    GPU_TASK,
    GPU_TASK_STAGES,
    STAGE_GROUP,
    fail_at_once_if_permanent,
    run_failures,
)
from facecaption_airflow.operators import GpuShardStageOperator, ShardStageOperator

# A shard busy elsewhere or a state-DB blip is worth another try; bad URLs never fail a task,
# and permanent errors (a missing model, a bad source) fail at once (see `failures`).
DEFAULT_ARGS = {
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
}


# What every facecaption DAG is: triggered or scheduled from 2026 on, no catch-up, params
# rendered as native objects (bools and lists stay so), tagged, with DEFAULT_ARGS.
DAG_DEFAULTS: dict[str, Any] = {
    "start_date": pendulum.datetime(2026, 1, 1, tz="UTC"),
    "catchup": False,
    "render_template_as_native_obj": True,
    "tags": ["facecaption"],
    "default_args": DEFAULT_ARGS,
}


# A mapped stage instance's label: its shard id. Templates render as native objects, and an id
# of digits and underscores (`154072588631_000000000_000000003`: about one source file in 300
# has such a prefix) is a Python int literal, so bare it would render as an int and fail the
# task before its stage ran. Written as a JSON string, it evaluates to the id itself.
SHARD_LABEL = "{{ task.shard_id | tojson }}"


def max_shards_param(**extra: Any) -> Param:
    return Param(
        None,
        type=["null", "integer"],
        minimum=1,
        title="Max shards",
        description="Work on at most this many shards (over the runs a large selection takes).",
        **extra,
    )


def process_shards(
    shard_ids: Any,
    force: str = "False",
    stages: str | None = None,
    retry_transient: bool = False,
    publish: str | bool = True,
) -> None:
    """Wire the mapped shard groups, the summary, the release and the run's check after the
    task producing `shard_ids`. `publish` (a template in build runs) turns the release step
    off."""

    # An in-process LLM needs a GPU; a model server (backend "openai") or the grammar alone
    # ("template") needs only a worker, and holds no `gpu` slot.
    settings = Settings()
    caption_on_gpu = settings.caption.backend == "transformers"
    gpu_stages = GPU_TASK_STAGES if caption_on_gpu else GPU_TASK_STAGES[:-1]
    # Opt-in: the GPU stages in one task pay one process start, DAG parse and slot per shard.
    task_stages = {GPU_TASK: gpu_stages} if settings.airflow.gpu_stages_in_one_task else {}

    @task_group(group_id=STAGE_GROUP)
    def process_shard(shard_id: str) -> None:
        def stage(
            operator: type[ShardStageOperator], name: str, runs: tuple[str, ...] = ()
        ) -> ShardStageOperator:
            return operator(
                task_id=name,
                stages=runs or (name,),
                shard_id=shard_id,
                force=force,
                selected_stages=stages,
                retry_transient=retry_transient,
                map_index_template=SHARD_LABEL,
            )

        if task_stages:
            tasks = [stage(ShardStageOperator, "fetch"),
                     stage(GpuShardStageOperator, GPU_TASK, gpu_stages)]  # fmt: skip
            if not caption_on_gpu:
                tasks.append(stage(ShardStageOperator, "caption"))
        else:
            caption_operator = GpuShardStageOperator if caption_on_gpu else ShardStageOperator
            tasks = [
                stage(ShardStageOperator, "fetch"),
                stage(GpuShardStageOperator, "detect"),
                stage(GpuShardStageOperator, "attribute"),
                stage(caption_operator, "caption"),
            ]
        tasks.append(stage(ShardStageOperator, "export"))
        chain(*tasks)

    @task(trigger_rule="all_done")
    @fail_at_once_if_permanent()
    def summary(shard_ids: list[str] | None) -> dict[str, Any]:
        from facecaption.core.pipeline import Pipeline, status_totals
        from facecaption.core.status import format_status

        skip_unless_planned(shard_ids)
        with Pipeline.open() as pipeline:
            rows = pipeline.status(shard_ids)
        print(format_status(rows))
        return status_totals(rows)

    groups = process_shard.expand(shard_id=shard_ids)
    finals = [summary(shard_ids), release_task(publish, shard_ids)]
    check = check_task(shard_ids, shard_group_id=STAGE_GROUP, task_stages=task_stages)
    # The next chunk is asked for whatever happened here; the check stays the run's only
    # leaf, so the run's colour is its verdict.
    next_chunk = NextChunkOperator(plan_task_id=shard_ids.operator.task_id)
    groups >> finals >> next_chunk >> check
    # directly after the shards too: a run cleared for its failed tasks only re-runs the
    # shards and the check, which must wait for them
    groups >> check


def skip_unless_planned(shard_ids: list[str] | None) -> None:
    """A summary or release after a plan that failed (it left no shard ids) has nothing new
    to report or publish: it is skipped, and the run's check says why the run failed."""
    from airflow.sdk.exceptions import AirflowSkipException

    if shard_ids is None:
        raise AirflowSkipException("the plan did not finish: no shard ran in this run")


def check_task(
    shard_ids: Any, shard_group_id: str, task_stages: dict[str, tuple[str, ...]] | None = None
) -> Any:
    """The run's last task: when everything else is done, fail the run (at once: its verdict
    is AirflowFailException) if a shard's stage failed, the plan failed or a source file
    could not be planned; the message names each failure (the stage and shard id)."""
    plan_task_id = shard_ids.operator.task_id

    @task(task_id=CHECK_TASK_ID, trigger_rule="all_done")
    def check(shard_ids: list[str] | None, **context: Any) -> None:
        from airflow.sdk.exceptions import AirflowFailException

        ti = context["ti"]
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id]).get(ti.run_id, {})
        failures = run_failures(
            states,
            shard_ids=shard_ids,
            plan_task_id=plan_task_id,
            shard_group_id=shard_group_id,
            plan_errors=ti.xcom_pull(task_ids=plan_task_id, key=PLAN_ERRORS_XCOM),
            task_stages=task_stages,
        )
        if failures:
            raise AirflowFailException(
                f"{len(failures)} failure(s) in this run: " + "; ".join(failures)
            )
        print(f"every stage of the {len(shard_ids or [])} shard(s) in this run finished")

    # A teardown whose failure fails the run: marking the run failed (UI, REST) skips every
    # task not yet finished but leaves a teardown to run, and leaves the run's state to it.
    # As an ordinary leaf it was skipped, and a scheduler pass that was already looking at
    # the run read "every leaf done, none failed" and wrote success over the operator's
    # failed. The check then fails the run for the instance the mark stopped.
    return check(shard_ids).as_teardown(on_failure_fail_dagrun=True)


def release_task(publish: str | bool, shard_ids: Any) -> Any:
    """The release step: publish the release files and manifest (exporting shards that are not
    up to date, applying pending takedowns) and write the HTML report. Skipped when the plan
    did not finish."""

    @task(task_id="release", trigger_rule="all_done")
    @fail_at_once_if_permanent()
    def release(publish: Any, shard_ids: list[str] | None) -> dict[str, Any]:
        from facecaption.core.pipeline import Pipeline
        from facecaption.release.publish import publish_release
        from facecaption.release.report import write_report

        skip_unless_planned(shard_ids)
        if publish in (False, "False", "false"):
            print("publishing the release is turned off for this run")
            return {"published": False}
        with Pipeline.open() as pipeline:
            report = publish_release(pipeline)
            summary = {**report.summary(), "report": write_report(pipeline)}
        print(f"release {summary['release']}: {summary['rows']} rows; report {summary['report']}")
        return summary

    return release(publish, shard_ids)


# The XCom key under which a plan task leaves {source file: error} for the files it could not
# plan (an empty dict when there were none); their shards are not in the run.
PLAN_ERRORS_XCOM = "plan_errors"


def planned_shard_ids(selection: Any, context: Any) -> list[str]:
    """What a plan task returns from a `WorkSelection`: the shard ids to map, this run's chunk
    of them (at most max_map_length; the next run of the chain takes the rest, see
    `facecaption_airflow.chunks`). Files that could not be planned are printed and pushed to
    XCom under PLAN_ERRORS_XCOM; the other files' shards run."""
    for uri, error in selection.plan_errors.items():
        print(f"could not plan {uri}: {error}")
    context["ti"].xcom_push(key=PLAN_ERRORS_XCOM, value=selection.plan_errors)
    return take_chunk(selection.shard_ids, context).shard_ids
