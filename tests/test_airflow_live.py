"""The build DAG on a real Airflow 3: `airflow db migrate`, then scheduler, dag-processor and
api-server as separate processes (LocalExecutor, metadata in a fresh Postgres database),
driven only through the public REST API v2, as a user or the UI trigger form would.

1. Trigger `facecaption_build` for a 3-shard source with every stage; it succeeds and each
   mapped stage has one task instance per shard, labelled by shard id.
2. Trigger a per-shard backfill (one shard, two stages, force); only those two stages of
   that shard get a new attempt in the state DB, nothing else.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from support.airflow_cluster import START_TIMEOUT_S, AirflowCluster, airflow_environment
from support.airflow_cluster import client as _client
from support.airflow_cluster import free_port as _free_port
from support.airflow_cluster import ok as _ok
from support.airflow_cluster import wait as _wait
from support.sampledata import write_source
from support.samplesite import Route, SampleSite

from facecaption.core.stage import stage_registry

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "facecaption_build"
SHARD_SIZE = 8  # the sample source's 24 rows: 3 shards
RERUN_STAGES = ["detect", "attribute"]
RUN_TIMEOUT_S = 360


@pytest.fixture
def airflow_metadata_url(empty_db_url: str) -> str:
    """A fresh, empty Postgres database for Airflow's own metadata, dropped afterwards."""
    return (
        make_url(empty_db_url)
        .set(drivername="postgresql+psycopg2")
        .render_as_string(hide_password=False)
    )


@pytest.fixture
def airflow_cluster(
    tmp_path: Path, airflow_metadata_url: str, settings_env: dict[str, str]
) -> Iterator[AirflowCluster]:
    home = tmp_path / "airflow"
    home.mkdir()
    port = _free_port()
    password = secrets.token_urlsafe(12)
    env = airflow_environment(
        home, port, airflow_metadata_url, password,
        core__executor="LocalExecutor", core__parallelism="2",
    )  # fmt: skip
    env.update(settings_env)
    env["FACECAPTION_SHARD_SIZE"] = str(SHARD_SIZE)
    cluster = AirflowCluster(home, env, port, password)
    migrate = cluster.airflow("db", "migrate", timeout=START_TIMEOUT_S)
    assert migrate.returncode == 0, f"airflow db migrate:\n{migrate.stdout}\n{migrate.stderr}"
    try:
        cluster.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(port))
        cluster.start("dag-processor", "dag-processor")
        cluster.start("scheduler", "scheduler", "--skip-serve-logs")
        yield cluster
    finally:
        cluster.stop()


def _trigger(api: httpx.Client, conf: dict[str, Any]) -> str:
    """What the UI's trigger form sends: a conf and no logical date."""
    run = _ok(
        api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf}),
        200,
    )
    return run["dag_run_id"]


def _wait_for_run(api: httpx.Client, cluster: AirflowCluster, run_id: str) -> None:
    def finished() -> str | None:
        state = _ok(api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}"))["state"]
        return state if state in ("success", "failed") else None

    state = _wait(f"run {run_id}", cluster, finished, RUN_TIMEOUT_S)
    if state != "success":
        tis = _task_instances(api, run_id)
        summary = [(t["task_id"], t["rendered_map_index"], t["state"]) for t in tis]
        raise AssertionError(f"run {run_id} {state}: {summary}\n{cluster.diagnostics()}")


def _task_instances(api: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    """Every task instance of the run, page by page (the API gives at most 100 a page)."""
    tis: list[dict[str, Any]] = []
    while True:
        body = _ok(
            api.get(
                f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances",
                params={"limit": 100, "offset": len(tis)},
            )
        )
        tis += body["task_instances"]
        if len(tis) >= body["total_entries"] or not body["task_instances"]:
            return tis


def _mapped(tis: list[dict[str, Any]], stage: str) -> dict[str, str]:
    """rendered map index (the shard id) -> state, of one stage's mapped task instances."""
    mine = [t for t in tis if t["task_id"] == f"process_shard.{stage}"]
    labels = {t["rendered_map_index"]: t["state"] for t in mine}
    assert len(labels) == len(mine), mine
    return labels


def _all_succeeded(tis: list[dict[str, Any]]) -> None:
    """plan, summary and whatever else the DAG has, mapped or not, all succeeded."""
    states = {(t["task_id"], t["rendered_map_index"]): t["state"] for t in tis}
    assert {"plan", "summary"} <= {task_id for task_id, _ in states}, states
    assert set(states.values()) == {"success"}, states


def _state_db(db_url: str) -> dict[str, Any]:
    """attempt per (shard, stage), and the events of each (shard, stage)."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            stages = conn.execute(
                sa.text("SELECT shard_id, stage, status, attempt FROM shard_stages")
            ).all()
            events = conn.execute(
                sa.text(
                    "SELECT shard_id, stage, attempt, event FROM stage_events ORDER BY event_id"
                )
            ).all()
    finally:
        engine.dispose()
    history: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for shard_id, stage, attempt, event in events:
        history.setdefault((shard_id, stage), []).append((attempt, event))
    return {
        "status": {(s, t): status for s, t, status, _ in stages},
        "attempt": {(s, t): attempt for s, t, _, attempt in stages},
        "events": history,
    }


def test_build_and_per_shard_rerun_through_the_rest_api(
    tmp_path, settings, sample, sample_site, airflow_cluster, browser, page_errors
):
    stages = list(stage_registry())
    assert set(RERUN_STAGES) < set(stages)
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    cluster = airflow_cluster
    with _client(cluster) as api:
        # The GPU stages take a slot of the `gpu` pool; the scheduler does not run tasks of a
        # pool that does not exist (docker compose's airflow-init creates it).
        _ok(api.post("/api/v2/pools", json={"name": "gpu", "slots": 2}), 201)

        def parsed() -> dict[str, Any] | None:
            response = api.get(f"/api/v2/dags/{DAG_ID}")
            if response.status_code == 404:
                errors = _ok(api.get("/api/v2/importErrors"))["import_errors"]
                ours = [e for e in errors if e["filename"].endswith(f"{DAG_ID}.py")]
                assert not ours, ours
                return None
            return _ok(response)

        dag = _wait(f"the dag-processor to parse {DAG_ID}", cluster, parsed, START_TIMEOUT_S)
        assert dag["is_paused"]  # new DAGs start paused
        assert not _ok(api.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}))["is_paused"]

        # 1. The whole source, every stage.
        run_id = _trigger(api, {"source": str(source), "stages": stages})
        _wait_for_run(api, cluster, run_id)

        first = _state_db(settings.db_url)
        shard_ids = sorted({shard_id for shard_id, _ in first["attempt"]})
        assert len(shard_ids) == 3
        for shard_id in shard_ids:
            for stage in stages:
                assert first["status"][(shard_id, stage)] == "done", (shard_id, stage)
                assert first["attempt"][(shard_id, stage)] == 1, (shard_id, stage)
                assert first["events"][(shard_id, stage)] == [(1, "started"), (1, "done")]
        tis = _task_instances(api, run_id)
        for stage in stages:
            assert _mapped(tis, stage) == dict.fromkeys(shard_ids, "success"), stage
        _all_succeeded(tis)

        # The plugin's shard view, served by the same api-server, shows the shards.
        page = api.get("/facecaption/shards")
        assert page.status_code == 200, page.text
        assert all(shard_id in page.text for shard_id in shard_ids)
        assert 'data-link="log"' in page.text  # each stage links to its task instance's log
        anonymous = httpx.get(f"{cluster.base_url}/facecaption/shards", timeout=30)
        assert anonymous.status_code == 401  # no Airflow session, no shard view

        # 2. Backfill one shard (the first: it has the photos): two stages, forced.
        target = shard_ids[0]
        rerun_id = _trigger(api, {"shard_ids": [target], "stages": RERUN_STAGES, "force": True})
        _wait_for_run(api, cluster, rerun_id)

        second = _state_db(settings.db_url)
        for shard_id in shard_ids:
            for stage in stages:
                key = (shard_id, stage)
                assert second["status"][key] == "done", key
                if shard_id == target and stage in RERUN_STAGES:
                    assert second["attempt"][key] == 2, key
                    assert second["events"][key] == [
                        *first["events"][key],
                        (2, "started"),
                        (2, "done"),
                    ]
                else:
                    assert second["attempt"][key] == first["attempt"][key], key
                    assert second["events"][key] == first["events"][key], key
        tis = _task_instances(api, rerun_id)
        for stage in stages:
            # Every stage's task is mapped over the one shard; the unselected ones succeed
            # without touching it.
            assert _mapped(tis, stage) == {target: "success"}, stage
        _all_succeeded(tis)

        # 3. The shard view's Re-run button, in Chromium, signed in with the UI's session
        # cookie: only `attribute` of the target shard, forced (ticked), the release not
        # published (the form's default).
        token = api.headers["Authorization"].removeprefix("Bearer ")
        with browser() as chromium:
            context = chromium.new_context()
            context.add_cookies([{"name": "_token", "value": token, "url": cluster.base_url}])
            page = context.new_page()
            errors = page_errors(page)
            page.goto(f"{cluster.base_url}/facecaption/shards/{target}")
            for box in page.locator("form#rerun input[name=stage]").all():
                if box.get_attribute("value") != "attribute":
                    box.uncheck()
            page.locator("form#rerun input[name=force]").check()  # off by default
            page.locator("form#rerun button").click()
            page.wait_for_selector("#rerun-result a", timeout=30_000)
            started = page.locator("#rerun-result a").inner_text()
        assert errors == []
        button_run = started.removeprefix("started run ")
        _wait_for_run(api, cluster, button_run)
        conf = _ok(api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{button_run}"))["conf"]
        assert conf == {
            "shard_ids": [target],
            "stages": ["attribute"],
            "force": True,
            "publish": False,
        }
        third = _state_db(settings.db_url)
        for key, attempt in second["attempt"].items():
            expected = attempt + 1 if key == (target, "attribute") else attempt
            assert third["attempt"][key] == expected, key


def test_a_run_an_operator_marks_failed_stays_failed(tmp_path, airflow_cluster):
    """The UI's "Mark run as failed" (REST: PATCH the run's state) on a run whose fetch is
    still working: the run ends failed and reads failed from then on, also after its running
    task instance was stopped and the scheduler went over the run again (before the check
    was a teardown, a scheduler pass racing the mark wrote success over it, about one run in
    two here)."""
    cluster = airflow_cluster
    # 50 shards of 8 rows on one host that answers nothing in time: fetching them takes
    # minutes
    slow = SampleSite({"slow.jpg": Route(b"x", "image/jpeg", delay_s=5)})
    with slow, _client(cluster) as api:
        source = tmp_path / "slow.parquet"
        urls = [slow.url(f"slow.jpg?{i}") for i in range(400)]
        pq.write_table(pa.table({"url": urls, "caption": ["a face"] * len(urls)}), source)
        _ok(api.post("/api/v2/pools", json={"name": "gpu", "slots": 2}), 201)
        _wait(f"the dag-processor to parse {DAG_ID}", cluster,
              lambda: api.get(f"/api/v2/dags/{DAG_ID}").status_code == 200 or None,
              START_TIMEOUT_S)  # fmt: skip
        _ok(api.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}))
        run_id = _trigger(api, {"source": str(source), "stages": ["fetch"], "publish": False})

        def fetch_running() -> bool | None:
            states = _mapped(_task_instances(api, run_id), "fetch").values()
            return "running" in states or None

        _wait("the fetch to start", cluster, fetch_running, RUN_TIMEOUT_S)
        marked = api.patch(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", json={"state": "failed"})
        # the running fetch is stopped and failed, the rest skipped; the check (a teardown)
        # still runs, and its verdict is the run's
        assert _ok(marked)["state"] in ("running", "failed")

        def run_state() -> str:
            return _ok(api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}"))["state"]

        assert _wait("the run to end", cluster, lambda: run_state() != "running" or None,
                     RUN_TIMEOUT_S)  # fmt: skip
        seen = []
        deadline = time.monotonic() + 30  # scheduler passes over the run, the stopped task's end
        while time.monotonic() < deadline:
            seen.append(run_state())
            time.sleep(1)
        assert set(seen) == {"failed"}, seen
        tis = _task_instances(api, run_id)
        assert "running" not in {t["state"] for t in tis}
        (check,) = [t for t in tis if t["task_id"] == "check"]
        assert check["state"] == "failed"
