"""A DAG run's state is the truth: a failed shard or plan fails the run (after the summary and
the release ran for the shards that finished), permanent errors are not retried, and a stage
instance an operator cleared runs its stage again."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest
from airflow.models.dagrun import DagRun
from airflow.utils.state import DagRunState
from facecaption_airflow.failures import (
    cleared_by_operator,
    fail_at_once_if_permanent,
    run_failures,
)
from support.sampledata import write_source

from facecaption.core.pipeline import Pipeline
from facecaption.core.stage import stage_registry
from facecaption.plan.sources import SourceError
from facecaption.settings import Settings
from facecaption.state.shards import ShardBusyError, UnknownShardError

REPO = Path(__file__).resolve().parents[1]
STAGES = list(stage_registry())
GROUP = "process_shard"


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_every_shard_dag_ends_with_the_check_after_the_shards_summary_and_release(dagbag):
    for dag_id in ("facecaption_build", "facecaption_refresh"):
        dag = dagbag.get_dag(dag_id)
        check = dag.get_task("check")
        # a teardown (runs when all else is done) whose failure fails the run: marking the
        # run failed leaves it to run (tests/test_airflow_live.py)
        assert check.trigger_rule == "all_done_setup_success"  # no setups: all done
        assert check.is_teardown and check.on_failure_fail_dagrun
        assert {t.task_id for t in check.upstream_list} >= {f"{GROUP}.export", "next_chunk"}
        next_chunk = dag.get_task("next_chunk")
        assert {t.task_id for t in next_chunk.upstream_list} >= {"summary", "release"}
        assert [task.task_id for task in dag.leaves] == ["check"], dag_id


def test_permanent_errors_fail_at_once_and_the_others_keep_their_retries() -> None:
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(pydantic.ValidationError):
        Settings(shard_size=0)  # what a bad FACECAPTION_* setting raises
    for permanent in (SourceError("gone"), UnknownShardError("no-such-shard")):
        with (
            pytest.raises(AirflowFailException, match="gone|no-such-shard") as raised,
            fail_at_once_if_permanent(),
        ):
            raise permanent
        assert raised.value.__cause__ is permanent
    with pytest.raises(AirflowFailException, match="ValidationError"), fail_at_once_if_permanent():
        Settings(shard_size=0)
    for transient in (ShardBusyError("busy"), OSError("disk full")):
        with pytest.raises(type(transient)), fail_at_once_if_permanent():
            raise transient

    @fail_at_once_if_permanent()
    def plan() -> None:
        raise SourceError("not parquet")

    with pytest.raises(AirflowFailException, match="not parquet"):
        plan()


def test_only_the_first_try_after_a_clear_counts_as_cleared() -> None:
    retries = 2
    assert not cleared_by_operator(1, retries, retries)  # the first run
    assert not cleared_by_operator(2, retries, retries)  # an automatic retry
    assert not cleared_by_operator(3, retries, retries)  # the last automatic retry
    # cleared after one try: Airflow sets max_tries to the tries so far + retries
    assert cleared_by_operator(2, 1 + retries, retries)
    assert not cleared_by_operator(3, 1 + retries, retries)  # then retried automatically
    assert cleared_by_operator(4, 3 + retries, retries)  # cleared again after three tries
    assert cleared_by_operator(2, 1, 0)  # no retries: every try after the first is a clear


def failures_of(states: dict, shard_ids: list[str] | None, **plan_errors: str) -> list[str]:
    return run_failures(
        states, shard_ids=shard_ids, plan_task_id="plan", shard_group_id=GROUP,
        plan_errors={f"{name}.parquet": error for name, error in plan_errors.items()},
    )  # fmt: skip


def test_run_failures_name_the_stage_and_shard_of_each_failure() -> None:
    states = {
        "plan": "success",
        f"{GROUP}.fetch_0": "success",
        f"{GROUP}.fetch_1": "failed",
        f"{GROUP}.detect_0": "success",
        f"{GROUP}.detect_1": "upstream_failed",
        "summary": "success",
        "release": "success",
        "check": "running",
    }
    assert failures_of(states, ["a", "b"], bad="not a readable parquet file") == [
        "could not plan bad.parquet: not a readable parquet file",
        "fetch of shard b failed",
    ]
    assert failures_of({key: "success" for key in states} | {"check": "running"}, ["a"]) == []
    refused = {"plan": "failed", f"{GROUP}.fetch": "upstream_failed", "summary": "skipped"}
    assert failures_of(refused, None) == ["plan failed, so no shard ran (its log says why)"]
    # marked failed while b's fetch ran: it was stopped (failed), b's detect and a's fetch skipped
    stopped = {
        "plan": "success", f"{GROUP}.fetch_0": "skipped", f"{GROUP}.fetch_1": "failed",
        f"{GROUP}.detect_1": "skipped", "summary": "skipped", "release": "skipped",
    }  # fmt: skip
    assert failures_of(stopped, ["a", "b"]) == [
        "fetch of shard b failed",
        "detect of shard b was skipped: the run was stopped",
        "fetch of shard a was skipped: the run was stopped",
    ]
    # an empty selection: the mapped stages are skipped (not expanded), nothing failed
    empty = {"plan": "success", f"{GROUP}.fetch": "skipped", "summary": "success"}
    assert failures_of(empty, []) == []
    eleven = [str(i) for i in range(11)]
    states = {f"{GROUP}.export_10": "upstream_failed", "release": "failed"}
    assert failures_of(states, eleven) == ["release failed"]
    # nothing failed, yet a stage did not run (a task someone marked failed, then cleared)
    states = {f"{GROUP}.export_10": "upstream_failed"}
    assert failures_of(states, eleven) == ["export of shard 10 did not run: upstream failed"]


# Every run below names source and shard_ids: a conf given to one dag.test() of a DAG object
# is seen by the next dag.test() of the same object as its defaults.
def use_settings(monkeypatch: pytest.MonkeyPatch, settings_env: dict[str, str]) -> None:
    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)


def task_instances(run) -> dict[tuple[str, int], object]:
    """(task id, map index) -> task instance (one that never ran has no rendered shard id)."""
    return {(ti.task_id, ti.map_index): ti for ti in run.get_task_instances()}


@pytest.mark.slow
def test_a_failing_shard_fails_the_run_after_the_other_shard_is_released(
    tmp_path, settings, settings_env, sample, sample_site, dagbag, monkeypatch
):
    """Two shards, one of whose source file is gone when its fetch starts (a permanent
    error): that fetch fails on its first try (retries unused), its later stages do not run,
    the other shard runs every stage and is released, and the run ends failed."""
    use_settings(monkeypatch, settings_env)
    base = sample_site.url("").rstrip("/")
    good = write_source(sample[:3], base, tmp_path / "good.parquet")
    gone = write_source(sample[3:6], base, tmp_path / "gone.parquet")
    with Pipeline.open(settings) as pipeline:
        (good_id,) = pipeline.select_shards([str(good)])
        (gone_id,) = pipeline.select_shards([str(gone)])
    gone.unlink()

    dag = dagbag.get_dag("facecaption_build")
    run = dag.test(run_conf={"source": None, "shard_ids": [good_id, gone_id]})

    assert run.state == "failed"
    tis = task_instances(run)
    good_index, gone_index = 0, 1  # mapped in the order asked for
    fetch = tis[(f"{GROUP}.fetch", gone_index)]
    assert (fetch.rendered_map_index, fetch.state) == (gone_id, "failed")
    assert (fetch.try_number, fetch.max_tries) == (1, 2)  # its two retries unused
    for stage in STAGES[1:]:
        assert tis[(f"{GROUP}.{stage}", gone_index)].state == "upstream_failed", stage
    for stage in STAGES:
        assert tis[(f"{GROUP}.{stage}", good_index)].state == "success", stage
    assert tis[("summary", -1)].state == "success"
    assert tis[("release", -1)].state == "success"
    check = tis[("check", -1)]
    assert (check.state, check.try_number) == ("failed", 1)
    release = Path(settings.artifact_root) / "release"
    assert list(json.loads((release / "manifest.json").read_text())["built_from"]) == [good_id]

    # the file is back; the run -> Clear -> only failed tasks: the failed and not-run tasks
    # and the check run again (the check after the shard), and the run turns green
    write_source(sample[3:6], base, gone)
    rerun = clear_and_run_again(
        dag, run.run_id, lambda scheduler_dag, session: scheduler_dag.clear(
            run_id=run.run_id, only_failed=True, dag_run_state="running", session=session
        ),
    )  # fmt: skip

    assert rerun.state == "success"
    tis = task_instances(rerun)
    assert tis[(f"{GROUP}.fetch", gone_index)].try_number == 2
    assert tis[(f"{GROUP}.fetch", good_index)].try_number == 1  # not cleared
    assert tis[("check", -1)].try_number == 2
    with Pipeline.open(settings) as pipeline:
        (row,) = pipeline.status([gone_id])
    assert {state.status for state in row.stages.values()} == {"done"}


@pytest.mark.slow
def test_a_source_file_that_cannot_be_planned_fails_the_run_after_the_others_are_released(
    tmp_path, settings, settings_env, sample, sample_site, dagbag, monkeypatch
):
    use_settings(monkeypatch, settings_env)
    good = write_source(sample[:3], sample_site.url("").rstrip("/"), tmp_path / "good.parquet")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not a parquet file")

    run = dagbag.get_dag("facecaption_build").test(
        run_conf={"source": [str(good), str(broken)], "shard_ids": []}
    )

    assert run.state == "failed"
    tis = task_instances(run)
    assert tis[("plan", -1)].state == "success"  # the good file's shard ran
    for stage in STAGES:
        assert tis[(f"{GROUP}.{stage}", 0)].state == "success", stage
    assert tis[("release", -1)].state == "success"
    assert tis[("check", -1)].state == "failed"
    with Pipeline.open(settings) as pipeline:
        (good_id,) = pipeline.select_shards([str(good)])
    release = Path(settings.artifact_root) / "release"
    assert list(json.loads((release / "manifest.json").read_text())["built_from"]) == [good_id]


@pytest.mark.slow
def test_a_plan_refused_fails_the_run_at_once_and_publishes_nothing(
    tmp_path, settings, settings_env, sample, sample_site, dagbag, monkeypatch
):
    """A permanent refusal at planning (a shard id that is not registered): the plan fails on
    its first try, nothing runs or is published, and the run is failed. (A selection longer
    than max_map_length is no refusal: the run takes a chunk, tests/test_chunks.py.)"""
    use_settings(monkeypatch, {**settings_env, "FACECAPTION_SHARD_SIZE": "3"})
    source = write_source(sample[:6], sample_site.url("").rstrip("/"), tmp_path / "two.parquet")

    run = dagbag.get_dag("facecaption_build").test(
        run_conf={"source": str(source), "shard_ids": ["no-such-shard"]}
    )

    assert run.state == "failed"
    tis = task_instances(run)
    plan = tis[("plan", -1)]
    assert (plan.state, plan.try_number, plan.max_tries) == ("failed", 1, 2)
    assert tis[("summary", -1)].state == "skipped"
    assert tis[("release", -1)].state == "skipped"
    assert tis[("check", -1)].state == "failed"
    assert not (Path(settings.artifact_root) / "release" / "manifest.json").exists()


@pytest.mark.slow
def test_clearing_a_stage_instance_runs_that_stage_again(
    tmp_path, settings, settings_env, sample, sample_site, dagbag, monkeypatch
):
    """A run that was not forced; the operator clears one shard's detect (UI: the mapped
    instance -> Clear -> just that task, which is `clear_task_instances`): detect runs again
    (a new attempt in the state DB), the stages after it are left as they were."""
    use_settings(monkeypatch, settings_env)
    source = write_source(sample[:3], sample_site.url("").rstrip("/"), tmp_path / "one.parquet")
    dag = dagbag.get_dag("facecaption_build")
    run = dag.test(run_conf={"source": str(source), "shard_ids": []})
    assert run.state == "success"
    with Pipeline.open(settings) as pipeline:
        (shard_id,) = pipeline.select_shards([str(source)])

    def clear_detect(scheduler_dag, session):
        from airflow.models.taskinstance import clear_task_instances

        run_now = DagRun.find(dag_id=dag.dag_id, run_id=run.run_id, session=session)[0]
        detect = run_now.get_task_instance(f"{GROUP}.detect", map_index=0, session=session)
        clear_task_instances([detect], session, dag_run_state=DagRunState.RUNNING)

    rerun = clear_and_run_again(dag, run.run_id, clear_detect)

    assert rerun.state == "success"
    detect = task_instances(rerun)[(f"{GROUP}.detect", 0)]
    assert (detect.rendered_map_index, detect.state, detect.try_number) == (shard_id, "success", 2)
    with Pipeline.open(settings) as pipeline:
        (row,) = pipeline.status([shard_id])
    assert row.stages["detect"].attempt == 2  # ran again, not skipped as up to date
    assert row.stages["fetch"].attempt == row.stages["attribute"].attempt == 1


def clear_and_run_again(dag, run_id: str, clear: Callable[[Any, Any], object]):
    """Clear task instances of a finished run with `clear(scheduler_dag, session)` (what the
    UI's and REST's Clear call), then run what the scheduler would schedule until the run
    ends, as `dag.test()` does; the run, reloaded."""
    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    with create_session() as session:
        clear(scheduler_dag, session)
        session.commit()
        run = DagRun.find(dag_id=dag.dag_id, run_id=run_id, session=session)[0]
        run.dag = scheduler_dag
        while run.state == DagRunState.RUNNING:
            session.expire_all()
            schedulable, _ = run.update_state(session=session)
            for ti in schedulable:
                ti.try_number += 1
                ti.state = TaskInstanceState.SCHEDULED
            session.commit()
            for ti in run.get_task_instances(state=[TaskInstanceState.SCHEDULED], session=session):
                _run_task(ti=ti, task=dag.task_dict[ti.task_id])
    return DagRun.find(dag_id=dag.dag_id, run_id=run_id)[0]
