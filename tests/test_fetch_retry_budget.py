"""Per-row retry budget across runs: a fetch row that failed transiently is fetched again by a
later run only once its pause has passed (doubling with each run), and after
`fetch.row_max_runs` runs it is final (`gave_up`, with its last error). A refresh in between
has nothing to do. Real loopback HTTP, real Postgres.

Time passing is the state DB's record of it moving back: the pauses are an hour and more, and
a test waits for none of them.
"""

from __future__ import annotations

from datetime import timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from conftest import REPO
from PIL import Image
from support.processes import settings_environment
from support.sampledata import encode
from support.samplesite import Route, SampleSite

from facecaption.core.pipeline import Pipeline
from facecaption.core.status import format_status, status_json
from facecaption.settings import Settings
from facecaption.state.retries import RowRetryLedger

REFUSED = "http://127.0.0.1:9/refused.jpg"  # nothing listens there
PAUSE_S = 3600
MAX_RUNS = 3


@pytest.fixture
def site():
    png = encode(Image.new("RGB", (48, 40), "teal"), "PNG")
    routes = {
        "ok.png": Route(png, "image/png"),
        "flaky.png": Route(status=503),  # every attempt of every run, until a test fixes it
        "gone.png": Route(status=404),
    }
    with SampleSite(routes) as served:
        yield served


@pytest.fixture
def budget_settings(settings: Settings) -> Settings:
    fetch = settings.fetch.model_copy(
        update={"row_retry_pause_s": PAUSE_S, "row_max_runs": MAX_RUNS}
    )
    return settings.model_copy(update={"fetch": fetch})


@pytest.fixture(scope="module")
def refresh_dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag("facecaption_refresh")


def plan(pipeline: Pipeline, tmp_path, site: SampleSite) -> str:
    urls = [site.url("ok.png"), site.url("flaky.png"), site.url("gone.png"), REFUSED]
    source = tmp_path / "source.parquet"
    pq.write_table(pa.table({"url": urls}), source)
    [shard_id] = pipeline.select_shards([str(source)])
    return shard_id


def refresh(pipeline: Pipeline, shard_id: str) -> None:
    """What the refresh DAG does for a shard it maps: every stage, retrying due work."""
    for stage in pipeline.stage_names:
        pipeline.run(stage, shard_id, retry_transient=True)


def time_passes(pipeline: Pipeline, shard_id: str, duration: timedelta) -> None:
    """Move every recorded moment of the shard's retry budget back by `duration`."""
    with pipeline.state.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE row_retries SET tried_at = tried_at - :d, due_at = due_at - :d"
                " WHERE shard_id = :s"
            ),
            {"d": duration, "s": shard_id},
        )
        conn.execute(
            sa.text("UPDATE shard_stages SET retry_at = retry_at - :d WHERE shard_id = :s"),
            {"d": duration, "s": shard_id},
        )


def rows_by_url(pipeline: Pipeline, shard_id: str) -> dict[str, dict]:
    fetch = pipeline.state.get_stage(shard_id, "fetch")
    table = pq.read_table(fetch.artifacts["fetch.parquet"]["uri"])
    return {row["url"]: row for row in table.to_pylist()}


def test_a_transient_row_waits_longer_each_run_then_gives_up(tmp_path, budget_settings, site):
    with Pipeline.open(budget_settings) as pipeline:
        shard_id = plan(pipeline, tmp_path, site)
        ledger = RowRetryLedger(pipeline.state.engine, "fetch")
        for stage in pipeline.stage_names:
            pipeline.run(stage, shard_id)
        first = pipeline.state.get_stage(shard_id, "fetch")
        assert (first.counts["retryable"], first.counts["ok"], first.counts["fetched"]) == (2, 1, 4)
        waiting = ledger.rows(shard_id)
        assert sorted(waiting) == ["1", "3"] and {r.runs for r in waiting.values()} == {1}
        assert {r.due_at - r.tried_at for r in waiting.values()} == {timedelta(seconds=PAUSE_S)}
        assert first.retry_at == min(r.due_at for r in waiting.values())

        # a refresh right after has nothing to do: no shard is work, no stage runs
        assert pipeline.select_work(status="work").shard_ids == []
        assert pipeline.select_work(status="retryable").shard_ids == []
        assert pipeline.run("fetch", shard_id, retry_transient=True).status == "skipped"
        time_passes(pipeline, shard_id, timedelta(seconds=PAUSE_S - 60))
        assert pipeline.select_work(status="work").shard_ids == []  # a minute to go

        # once the pause has passed the shard is work again, and only its waiting rows run
        time_passes(pipeline, shard_id, timedelta(seconds=120))
        assert pipeline.select_work(status="work").shard_ids == [shard_id]
        hits = dict(site.hits)
        refresh(pipeline, shard_id)
        second = pipeline.state.get_stage(shard_id, "fetch")
        assert (second.attempt, second.counts["fetched"], second.counts["retryable"]) == (2, 2, 2)
        assert site.hits["ok.png"] == hits["ok.png"] and site.hits["gone.png"] == hits["gone.png"]
        waiting = ledger.rows(shard_id)
        assert {r.runs for r in waiting.values()} == {2}
        assert {r.due_at - r.tried_at for r in waiting.values()} == {timedelta(seconds=2 * PAUSE_S)}
        assert pipeline.select_work(status="work").shard_ids == []
        time_passes(pipeline, shard_id, timedelta(seconds=PAUSE_S + 60))
        assert pipeline.select_work(status="work").shard_ids == []  # the pause doubled

        # the run that spends the budget makes the rows final: gave_up, with the last error
        time_passes(pipeline, shard_id, timedelta(seconds=PAUSE_S))
        assert pipeline.select_work(status="work").shard_ids == [shard_id]
        refresh(pipeline, shard_id)
        third = pipeline.state.get_stage(shard_id, "fetch")
        assert (third.attempt, third.counts["fetched"], third.counts["gave_up"]) == (3, 2, 2)
        assert third.counts["retryable"] == 0 and third.retry_at is None
        assert ledger.rows(shard_id) == {}
        rows = rows_by_url(pipeline, shard_id)
        flaky, refused = rows[site.url("flaky.png")], rows[REFUSED]
        assert flaky["status"] == refused["status"] == "gave_up"
        assert flaky["http_status"] == 503
        assert flaky["error"].startswith(f"after {MAX_RUNS} runs, the last http_error")
        assert refused["error"].startswith(f"after {MAX_RUNS} runs, the last connection_error")

        # and from then on nothing is work, however long it waits
        assert pipeline.select_work(status="work").shard_ids == []
        time_passes(pipeline, shard_id, timedelta(days=365))
        assert pipeline.select_work(status="work").shard_ids == []


def test_a_rerun_changes_nothing_for_final_rows(tmp_path, budget_settings, site):
    settings = budget_settings.model_copy(
        update={"fetch": budget_settings.fetch.model_copy(update={"row_max_runs": 1})}
    )
    with Pipeline.open(settings) as pipeline:
        shard_id = plan(pipeline, tmp_path, site)
        first = pipeline.run("fetch", shard_id)
        assert first.counts["gave_up"] == 2 and first.counts["retryable"] == 0
        before = rows_by_url(pipeline, shard_id)
        hits = dict(site.hits)
        again = pipeline.run("fetch", shard_id, force=True)
        assert again.counts["fetched"] == 0 and again.counts["reused"] == 4
        assert rows_by_url(pipeline, shard_id) == before
        assert (
            again.artifacts["fetch.parquet"]["sha256"] == first.artifacts["fetch.parquet"]["sha256"]
        )
        assert site.hits == hits


def test_only_due_rows_are_fetched_and_a_recovered_row_leaves_the_budget(
    tmp_path, budget_settings, site
):
    with Pipeline.open(budget_settings) as pipeline:
        shard_id = plan(pipeline, tmp_path, site)
        pipeline.run("fetch", shard_id)
        before = rows_by_url(pipeline, shard_id)
        # only the flaky row's pause has passed (the shard's first due moment with it)
        with pipeline.state.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE row_retries SET due_at = now() - interval '1 minute'"
                    " WHERE shard_id = :s AND stage = 'fetch' AND key = '1'"
                ),
                {"s": shard_id},
            )
            conn.execute(
                sa.text(
                    "UPDATE shard_stages SET retry_at = now() - interval '1 minute'"
                    " WHERE shard_id = :s AND stage = 'fetch'"
                ),
                {"s": shard_id},
            )
        site.routes["flaky.png"] = site.routes["ok.png"]  # the server is back
        outcome = pipeline.run("fetch", shard_id, retry_transient=True)
        assert outcome.status == "done" and outcome.counts["fetched"] == 1
        assert (outcome.counts["ok"], outcome.counts["retryable"]) == (1, 1)  # a duplicate now
        rows = rows_by_url(pipeline, shard_id)
        assert rows[site.url("flaky.png")]["status"] == "duplicate"
        assert rows[REFUSED] == before[REFUSED]  # left alone: not due
        waiting = RowRetryLedger(pipeline.state.engine, "fetch").rows(shard_id)
        assert list(waiting) == ["3"] and waiting["3"].runs == 1
        assert pipeline.state.get_stage(shard_id, "fetch").retry_at == waiting["3"].due_at


def test_a_forced_run_does_not_wait_but_counts(tmp_path, budget_settings, site):
    with Pipeline.open(budget_settings) as pipeline:
        shard_id = plan(pipeline, tmp_path, site)
        pipeline.run("fetch", shard_id)
        forced = pipeline.run("fetch", shard_id, force=True)
        assert forced.counts["fetched"] == 2 and forced.counts["retryable"] == 2
        runs = {
            r.runs for r in RowRetryLedger(pipeline.state.engine, "fetch").rows(shard_id).values()
        }
        assert runs == {2}


def test_status_shows_rows_that_gave_up_and_when_retries_are_due(tmp_path, budget_settings, site):
    with Pipeline.open(budget_settings) as pipeline:
        shard_id = plan(pipeline, tmp_path, site)
        pipeline.run("fetch", shard_id)
        waiting = pipeline.status([shard_id])
        due = status_json(waiting)["shards"][0]["stages"]["fetch"]["retry_at"]
        assert due == pipeline.state.get_stage(shard_id, "fetch").retry_at.isoformat()
        for _ in range(MAX_RUNS - 1):
            pipeline.run("fetch", shard_id, force=True)
        rows = pipeline.status([shard_id])
    table = format_status(rows)
    assert "done 1/4, 2 gave up" in table
    assert "gave_up 2" in table.splitlines()[-5]  # the fetch summary line
    assert status_json(rows)["shards"][0]["stages"]["fetch"]["retry_at"] is None


def test_settings_bound_the_budget():
    with pytest.raises(ValueError):
        Settings(fetch={"row_max_runs": 0})
    with pytest.raises(ValueError):
        Settings(fetch={"row_retry_pause_s": -1})


def mapped_shards(run, stage: str = "fetch") -> list[str]:
    """The shards a DAG run mapped a stage's task over."""
    return [
        ti.rendered_map_index
        for ti in run.get_task_instances()
        if ti.task_id == f"process_shard.{stage}" and ti.map_index >= 0
    ]


@pytest.mark.slow
def test_the_refresh_dag_maps_no_shard_until_a_pause_has_passed(
    tmp_path, budget_settings, site, refresh_dag, monkeypatch
):
    with Pipeline.open(budget_settings) as pipeline:
        shard_id = plan(pipeline, tmp_path, site)
        for stage in pipeline.stage_names:
            pipeline.run(stage, shard_id)
    for name, value in settings_environment(budget_settings).items():
        monkeypatch.setenv(name, value)

    idle = refresh_dag.test()
    assert idle.state == "success" and mapped_shards(idle) == []

    with Pipeline.open(budget_settings) as pipeline:
        time_passes(pipeline, shard_id, timedelta(seconds=PAUSE_S + 60))
    due = refresh_dag.test()
    assert due.state == "success" and mapped_shards(due) == [shard_id]
    with Pipeline.open(budget_settings) as pipeline:
        fetch = pipeline.state.get_stage(shard_id, "fetch")
    assert (fetch.attempt, fetch.counts["fetched"], fetch.counts["retryable"]) == (2, 2, 2)
