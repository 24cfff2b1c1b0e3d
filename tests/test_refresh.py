"""The refresh DAG: new source files, stale stages and retryable rows run; nothing else does."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from PIL import Image
from support.sampledata import encode
from support.samplesite import Route, SampleSite
from test_select import build_all

from facecaption.core.pipeline import Pipeline


@pytest.fixture(scope="module")
def refresh_dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag("facecaption_refresh")


def _attempts(settings, shard_ids):
    with Pipeline.open(settings) as pipeline:
        return {
            (shard_id, stage): pipeline.state.get_stage(shard_id, stage).attempt
            for shard_id in shard_ids
            for stage in pipeline.stage_names
        }


def _environment(monkeypatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.slow
def test_refresh_runs_new_shards_and_the_stale_stage_only(
    tmp_path, settings, settings_env, sample, sample_site, refresh_dag, monkeypatch
):
    settings, old_shards, _ = build_all(tmp_path, settings, sample, sample_site)
    new_file = tmp_path / "more.parquet"
    # an image no old shard holds (one they hold could change owner: see test_dedup)
    sample_site.routes["more/new.png"] = Route(
        encode(Image.new("RGB", (64, 48), "teal"), "PNG"), "image/png"
    )
    pq.write_table(pa.table({"URL": [sample_site.url("more/new.png")] * 3}), new_file)
    _environment(
        monkeypatch,
        {
            **settings_env,
            "FACECAPTION_SHARD_SIZE": "8",
            "FACECAPTION_REFRESH__SOURCES": f'["{tmp_path}"]',  # the folder: old file and new
            "FACECAPTION_ATTRIBUTE__THRESHOLD": "0.9",  # makes every attribute stage stale
        },
    )
    before = _attempts(settings, old_shards)
    with Pipeline.open(settings) as pipeline:
        fetch_before = {s: pipeline.state.get_stage(s, "fetch") for s in old_shards}

    run = refresh_dag.test()

    assert run.state == "success"
    with Pipeline.open(settings) as pipeline:
        new_shards = [s for s in pipeline.select_shards() if s not in old_shards]
        fetch_after = {s: pipeline.state.get_stage(s, "fetch") for s in old_shards}
    assert len(new_shards) == 1
    after = _attempts(settings, old_shards + new_shards)
    for shard_id in new_shards:
        assert all(after[(shard_id, stage)] == 1 for stage in ("fetch", "detect", "attribute"))
    for shard_id in old_shards:
        retryable = fetch_before[shard_id].counts["retryable"]
        # fetch again only where rows failed transiently, and only those rows
        assert after[(shard_id, "fetch")] == before[(shard_id, "fetch")] + bool(retryable)
        if retryable:
            assert fetch_after[shard_id].counts["fetched"] == retryable
        changed = fetch_after[shard_id].artifacts != fetch_before[shard_id].artifacts
        assert after[(shard_id, "detect")] == before[(shard_id, "detect")] + changed
        assert after[(shard_id, "attribute")] == before[(shard_id, "attribute")] + 1
    assert any(fetch_before[s].counts["retryable"] for s in old_shards)  # the sample has some
    # a second refresh finds nothing to do but the rows that keep failing transiently
    assert refresh_dag.test().state == "success"
    again = _attempts(settings, old_shards + new_shards)
    for (shard_id, stage), attempts in again.items():
        retrying = (
            stage == "fetch"
            and shard_id in old_shards
            and fetch_after[shard_id].counts["retryable"]
        )
        assert attempts == after[(shard_id, stage)] + bool(retrying), (shard_id, stage)


@pytest.mark.slow
def test_refresh_retries_only_the_transient_rows(
    tmp_path, settings, settings_env, refresh_dag, monkeypatch
):
    png = encode(Image.new("RGB", (32, 32)), "PNG")
    attempts_in_first_run = settings.fetch.retries + 1
    routes = {
        "ok.png": Route(png, "image/png"),
        "flaky.png": Route(
            png + b"x", "image/png", fail_first=attempts_in_first_run, fail_status=500
        ),
    }
    with SampleSite(routes) as site:
        source = tmp_path / "flaky.parquet"
        pq.write_table(pa.table({"url": [site.url("ok.png"), site.url("flaky.png")]}), source)
        with Pipeline.open(settings) as pipeline:
            [shard_id] = pipeline.select_shards([str(source)])
            first = pipeline.run("fetch", shard_id)
            assert first.counts["retryable"] == 1 and first.counts["ok"] == 1
            assert pipeline.select_work(status="retryable").shard_ids == [shard_id]
        _environment(monkeypatch, settings_env)

        assert refresh_dag.test().state == "success"
        hits = dict(site.hits)
    with Pipeline.open(settings) as pipeline:
        fetch = pipeline.state.get_stage(shard_id, "fetch")
    assert fetch.attempt == 2
    assert (fetch.counts["fetched"], fetch.counts["reused"], fetch.counts["ok"]) == (1, 1, 2)
    assert fetch.counts["retryable"] == 0
    assert hits["ok.png"] == 1 and hits["flaky.png"] == attempts_in_first_run + 1
