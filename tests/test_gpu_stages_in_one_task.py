"""`airflow.gpu_stages_in_one_task`: a shard's GPU stages run in one `gpu` task (one process
start, DAG parse and `gpu` slot per shard), in order, stopping at the first that fails; the
run's check and the shard view map that task back to its stages."""

from __future__ import annotations

from pathlib import Path

import pytest
from facecaption_airflow.airflow_tasks import latest_stage_tasks
from facecaption_airflow.failures import run_failures
from support.sampledata import write_source

from facecaption.core.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]
GROUP = "process_shard"
ONE_TASK_ENV = "FACECAPTION_AIRFLOW__GPU_STAGES_IN_ONE_TASK"


def build_dag(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]):
    """The build DAG parsed with `env`, from a DagBag of its own (the setting is read when the
    file is parsed; dag.test() leaves a run's conf in the DAG's params)."""
    from airflow.dag_processing.dagbag import DagBag

    for name, value in {ONE_TASK_ENV: "true", **env}.items():
        monkeypatch.setenv(name, value)
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag("facecaption_build")


def upstream(dag, task_id: str) -> set[str]:
    """The task's upstream tasks but the plan (every mapped task reads its shard ids)."""
    return {task.task_id for task in dag.get_task(task_id).upstream_list} - {"plan"}


@pytest.mark.parametrize(
    ("backend", "gpu_stages", "caption_task"),
    [
        ("transformers", ("detect", "attribute", "caption"), False),
        ("template", ("detect", "attribute"), True),
    ],
)
def test_the_gpu_stages_run_in_one_gpu_task_when_configured(
    backend, gpu_stages, caption_task, airflow_db, monkeypatch
):
    dag = build_dag(monkeypatch, {"FACECAPTION_CAPTION__BACKEND": backend})

    group = {task_id for task_id in dag.task_dict if task_id.startswith(f"{GROUP}.")}
    gpu = dag.get_task(f"{GROUP}.gpu")
    assert (gpu.queue, gpu.pool) == ("gpu", "gpu")
    assert gpu.stages == gpu_stages
    assert upstream(dag, f"{GROUP}.gpu") == {f"{GROUP}.fetch"}
    if caption_task:
        assert group == {f"{GROUP}.{name}" for name in ("fetch", "gpu", "caption", "export")}
        assert dag.get_task(f"{GROUP}.caption").queue != "gpu"
        assert upstream(dag, f"{GROUP}.caption") == {f"{GROUP}.gpu"}
        assert upstream(dag, f"{GROUP}.export") == {f"{GROUP}.caption"}
    else:
        assert group == {f"{GROUP}.{name}" for name in ("fetch", "gpu", "export")}
        assert upstream(dag, f"{GROUP}.export") == {f"{GROUP}.gpu"}
    assert dag.get_task(f"{GROUP}.fetch").stages == ("fetch",)
    assert f"{GROUP}.export" in upstream(dag, "summary")


def test_the_check_names_the_stages_of_the_one_gpu_task() -> None:
    states = {"plan": "success", f"{GROUP}.gpu_1": "failed", f"{GROUP}.export_1": "upstream_failed"}
    assert run_failures(
        states, shard_ids=["a", "b"], plan_task_id="plan", shard_group_id=GROUP,
        task_stages={"gpu": ("detect", "attribute")},
    ) == ["gpu (detect, attribute) of shard b failed"]  # fmt: skip


@pytest.mark.slow
def test_a_build_with_the_gpu_stages_in_one_task_does_every_stage(
    tmp_path, settings, settings_env, sample, sample_site, airflow_db, monkeypatch
):
    dag = build_dag(monkeypatch, {**settings_env, "FACECAPTION_SHARD_SIZE": "8"})
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")

    run = dag.test(run_conf={"source": str(source), "shard_ids": [], "publish": False})

    assert run.state == "success"
    with Pipeline.open(settings.model_copy(update={"shard_size": 8})) as pipeline:
        shard_ids = pipeline.select_shards([str(source)])
        rows = pipeline.status(shard_ids)
    assert len(shard_ids) == 3
    for row in rows:
        assert {name: state.status for name, state in row.stages.items()} == {
            name: "done" for name in ("fetch", "detect", "attribute", "caption", "export")
        }
        assert row.stages["detect"].attempt == row.stages["attribute"].attempt == 1
    gpu = [ti for ti in run.get_task_instances() if ti.task_id == f"{GROUP}.gpu"]
    assert sorted(ti.rendered_map_index for ti in gpu) == sorted(shard_ids)
    assert {(ti.state, ti.try_number) for ti in gpu} == {("success", 1)}
    # the shard view links detect and attribute to the gpu task, caption to its own
    from airflow.utils.session import create_session

    with create_session() as session:
        tasks = latest_stage_tasks(session, [dag.dag_id], shard_ids)
    for shard_id in shard_ids:
        assert tasks[(shard_id, "detect")].task_id == f"{GROUP}.gpu"
        assert tasks[(shard_id, "attribute")].task_id == f"{GROUP}.gpu"
        assert tasks[(shard_id, "caption")].task_id == f"{GROUP}.caption"
        assert tasks[(shard_id, "export")].run_id == run.run_id


@pytest.mark.slow
def test_a_refused_gpu_stage_fails_the_one_task_at_once_and_the_check_names_it(
    tmp_path, settings, settings_env, sample, sample_site, airflow_db, monkeypatch, capfd
):
    """Fetch not selected and never run: detect refuses its input (a permanent error), so the
    gpu task fails on its first try, attribute does not run, and the run fails."""
    dag = build_dag(monkeypatch, settings_env)
    source = write_source(sample[:3], sample_site.url("").rstrip("/"), tmp_path / "one.parquet")
    with Pipeline.open(settings) as pipeline:
        (shard_id,) = pipeline.select_shards([str(source)])

    run = dag.test(
        run_conf={"source": None, "shard_ids": [shard_id], "publish": False,
                  "stages": ["detect", "attribute", "caption", "export"]}
    )  # fmt: skip

    assert run.state == "failed"
    tis = {ti.task_id: ti for ti in run.get_task_instances()}
    gpu = tis[f"{GROUP}.gpu"]
    assert (gpu.rendered_map_index, gpu.state, gpu.try_number) == (shard_id, "failed", 1)
    assert tis[f"{GROUP}.caption"].state == "upstream_failed"
    assert tis["check"].state == "failed"
    # the check's verdict, in its log
    assert f"gpu (detect, attribute) of shard {shard_id} failed" in capfd.readouterr().out
    with Pipeline.open(settings) as pipeline:
        (row,) = pipeline.status([shard_id])
    assert row.stages["attribute"].status == "pending"
