"""One trigger works through more shards than Airflow maps in one run: a chain of runs, each
taking the next chunk after the last shard of the one before (real Airflow, `dag.test()`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.sampledata import write_source

from facecaption.core.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def dagbag(airflow_db):
    """A DagBag of its own per test: dag.test() runs tasks in this process, and Airflow then
    writes a run's conf into the DAG object's Params (a later run without `after` would
    inherit the last one's)."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def unfinished(run) -> dict[str, str]:
    """The run's task instances that did not succeed: what a failed run's assertion shows."""
    return {
        f"{ti.task_id}[{ti.map_index}]": f"{ti.state} (try {ti.try_number})"
        for ti in run.get_task_instances()
        if ti.state != "success"
    }


def test_the_next_conf_keeps_the_work_and_moves_past_the_chunk():
    from facecaption_airflow.chunks import Chunk

    chunk = Chunk(number=2, first_run="manual__x", shard_ids=["c", "d"], remain=3)
    conf = {"source": "s.parquet", "max_shards": 7, "after": "b", "chunk": 2}
    assert chunk.next_conf(conf) == {
        "source": "s.parquet",
        "max_shards": 5,
        "after": "d",
        "chunk": 3,
        "first_run": "manual__x",
    }
    assert chunk.next_conf({})["max_shards"] is None  # no limit stays no limit
    assert Chunk(3, "manual__x", ["e"], remain=0).next_conf(conf) is None
    assert Chunk(1, "manual__x", [], remain=0).describe() == "chunk 1: no shards"


def test_build_and_refresh_end_by_triggering_the_next_chunk(dagbag):
    for dag_id, plan in (("facecaption_build", "plan"), ("facecaption_refresh", "find_work")):
        dag = dagbag.get_dag(dag_id)
        assert {"after", "chunk_size"} <= set(dag.params), dag_id
        next_chunk = dag.get_task("next_chunk")
        assert next_chunk.plan_task_id == plan
        assert {t.task_id for t in next_chunk.upstream_list} >= {"summary", "release"}
        assert next_chunk.trigger_rule == "all_done"  # failed shards never stop the chain


@pytest.mark.slow
def test_one_trigger_works_through_five_shards_with_max_map_length_two(
    tmp_path, settings, settings_env, sample, sample_site, dagbag, monkeypatch
):
    """24 rows in shards of 5 are 5 shards; Airflow maps at most 2 per run. The first run
    maps 2 and triggers a run of the same DAG with the same conf after its last shard; that
    one maps the next 2, the third the last 1 and triggers nothing. The triggered runs are
    executed here with dag.test() on the conf the trigger recorded (no scheduler runs)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    for name, value in {**settings_env, "FACECAPTION_SHARD_SIZE": "5"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "2")
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    dag = dagbag.get_dag("facecaption_build")
    conf: dict | None = {"source": str(source), "stages": ["fetch"], "publish": False}

    chunks, notes, first_run = [], [], None
    while conf is not None:
        run = dag.test(run_conf=conf)
        assert run.state == "success", unfinished(run)
        first_run = first_run or run.run_id
        tis = {ti.task_id: ti for ti in run.get_task_instances() if ti.map_index < 1}
        chunk = tis["plan"].xcom_pull(task_ids="plan", key="chunk")
        assert chunk["first_run"] == first_run
        chunks.append(chunk["shard_ids"])
        mapped = [t for t in run.get_task_instances() if t.task_id == "process_shard.fetch"]
        assert sorted(t.rendered_map_index for t in mapped) == sorted(chunk["shard_ids"])
        assert tis["next_chunk"].state == "success"
        run_id = tis["next_chunk"].xcom_pull(task_ids="next_chunk", key="trigger_run_id")
        if not chunk["remain"]:
            assert run_id is None  # the last run triggers nothing
            conf = None
            continue
        assert run_id == f"{first_run}__chunk{len(chunks) + 1}"
        with create_session() as session:
            triggered = session.scalars(select(DagRun).where(DagRun.run_id == run_id)).one()
            assert triggered.state == "queued"  # a scheduler would start it
            conf, note = dict(triggered.conf), triggered.note
        assert conf == {
            "source": str(source), "stages": ["fetch"], "publish": False,
            "after": chunk["shard_ids"][-1], "max_shards": None,
            "chunk": len(chunks) + 1, "first_run": first_run,
        }  # fmt: skip
        notes.append(note)

    assert [len(c) for c in chunks] == [2, 2, 1]
    assert notes[0] == f"chunk 2 of {first_run}: the 3 shards after {chunks[0][-1]}"
    with Pipeline.open(settings.model_copy(update={"shard_size": 5})) as pipeline:
        shard_ids = pipeline.select_shards([str(source)])
        assert [s for c in chunks for s in c] == shard_ids  # each once, in planning order
        assert {row.stages["fetch"].status for row in pipeline.status(shard_ids)} == {"done"}


@pytest.mark.slow
def test_max_shards_bounds_the_whole_chain(
    tmp_path, settings, settings_env, sample, sample_site, dagbag, monkeypatch
):
    """max_shards counts over the chain: 3 of 5 shards in chunks of 2 are 2 runs, and the
    second run's conf asks for the 1 that is left of the 3."""
    for name, value in {**settings_env, "FACECAPTION_SHARD_SIZE": "5"}.items():
        monkeypatch.setenv(name, value)
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    dag = dagbag.get_dag("facecaption_build")
    conf = {"source": str(source), "stages": ["fetch"], "publish": False, "max_shards": 3,
            "chunk_size": 2}  # fmt: skip

    first = dag.test(run_conf=conf)
    plan = next(ti for ti in first.get_task_instances() if ti.task_id == "plan")
    chunk = plan.xcom_pull(task_ids="plan", key="chunk")
    assert (len(chunk["shard_ids"]), chunk["remain"]) == (2, 1)
    assert chunk["next_conf"]["max_shards"] == 1
    second = dag.test(run_conf=chunk["next_conf"])
    plan = next(ti for ti in second.get_task_instances() if ti.task_id == "plan")
    last = plan.xcom_pull(task_ids="plan", key="chunk")
    assert (len(last["shard_ids"]), last["remain"], last["next_conf"]) == (1, 0, None)
    with Pipeline.open(settings.model_copy(update={"shard_size": 5})) as pipeline:
        shard_ids = pipeline.select_shards([str(source)])
    assert chunk["shard_ids"] + last["shard_ids"] == shard_ids[:3]
