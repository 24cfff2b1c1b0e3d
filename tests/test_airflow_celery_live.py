"""The build DAG on Airflow's CeleryExecutor, set up as docker-compose.yml sets it up: Redis as
the broker (the one on loopback, a database and key prefix of this test's own), Airflow's
metadata DB as the result backend through `db+postgresql+psycopg2`, then api-server,
scheduler, dag-processor and two `airflow celery worker`s: `cpu` on the default queue and
`gpu` on the `gpu` queue. Each worker names itself as the host of the task instances it runs
(`[core] hostname_callable`). Driven and checked through REST API v2 only:

- every fetch, export and caption (the grammar's: no LLM) and plan, summary, release ran on
  the `cpu` worker from the default queue; every detect and attribute on the `gpu` worker, in
  the `gpu` pool, whose one slot keeps them one at a time although that worker could run two;
- a shard whose source file went away after planning fails its fetch task (its later stages
  do not run), while the other shards finish every stage.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy.engine import make_url
from support.airflow_cluster import (
    START_TIMEOUT_S,
    WORKER_NAME_VARIABLE,
    AirflowCluster,
    airflow_environment,
    client,
    free_port,
    ok,
    wait,
)
from support.sampledata import write_source

from facecaption.core.pipeline import Pipeline
from facecaption.core.stage import stage_registry
from facecaption.settings import Settings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "facecaption_build"
SHARD_SIZE = 4  # a.parquet: 8 rows, 2 shards; b.parquet: 4 rows, 1 shard
REDIS_URL = os.environ.get("FACECAPTION_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
RUN_TIMEOUT_S = 600  # the failing fetch is retried (DEFAULT_ARGS) before it fails
WORKERS = {"cpu": "default", "gpu": "gpu"}  # worker name -> the queue it takes
GPU_STAGES = {"detect", "attribute"}  # captions here are the grammar's (`template`): no GPU


@pytest.fixture
def redis_broker() -> Iterator[tuple[str, str]]:
    """(broker URL, key prefix): every key this test's Celery writes carries the prefix, and
    is deleted afterwards."""
    connection = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        connection.ping()
    except redis.exceptions.ConnectionError as error:
        pytest.skip(f"no Redis at {REDIS_URL} ({error})")
    prefix = f"facecaption-test-{uuid.uuid4().hex[:12]}:"
    try:
        yield REDIS_URL, prefix
    finally:
        keys = list(connection.scan_iter(match=f"{prefix}*"))
        if keys:
            connection.delete(*keys)
        connection.close()


@pytest.fixture
def celery_cluster(
    tmp_path: Path, empty_db_url: str, settings_env: dict[str, str], redis_broker
) -> Iterator[AirflowCluster]:
    home = tmp_path / "airflow"
    home.mkdir()
    port = free_port()
    password = secrets.token_urlsafe(12)
    metadata = make_url(empty_db_url).set(drivername="postgresql+psycopg2")
    metadata_url = metadata.render_as_string(hide_password=False)
    broker_url, key_prefix = redis_broker
    env = airflow_environment(
        home,
        port,
        metadata_url,
        password,
        core__executor="CeleryExecutor",
        core__parallelism="8",
        celery__broker_url=broker_url,
        celery__result_backend=f"db+{metadata_url}",
        celery__worker_concurrency="2",
        celery__sync_parallelism="1",
        celery_broker_transport_options__global_keyprefix=key_prefix,
    )
    env.update(settings_env)
    env["FACECAPTION_SHARD_SIZE"] = str(SHARD_SIZE)
    cluster = AirflowCluster(home, env, port, password)
    migrate = cluster.airflow("db", "migrate", timeout=START_TIMEOUT_S)
    assert migrate.returncode == 0, f"airflow db migrate:\n{migrate.stdout}\n{migrate.stderr}"
    # The workers find `support.airflow_cluster.worker_hostname` on their PYTHONPATH.
    python_path = os.pathsep.join(p for p in (str(REPO / "tests"), env.get("PYTHONPATH")) if p)
    try:
        cluster.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(port))
        cluster.start("dag-processor", "dag-processor")
        cluster.start("scheduler", "scheduler", "--skip-serve-logs")
        for name, queue in WORKERS.items():
            cluster.start(
                f"worker-{name}",
                *("celery", "worker", "--queues", queue, "--concurrency", "2"),
                *("--celery-hostname", f"{name}@%h", "--skip-serve-logs"),
                env={
                    WORKER_NAME_VARIABLE: name,
                    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "support.airflow_cluster.worker_hostname",
                    "PYTHONPATH": python_path,
                },
            )
        yield cluster
    finally:
        cluster.stop()


def _plan(settings: Settings, sample: list, base_url: str, folder: Path) -> tuple[list, list]:
    """Plan a.parquet and b.parquet here (as `facecaption plan` would), then remove b.parquet:
    (a's shard ids, b's shard ids)."""
    kept = write_source(sample[:8], base_url, folder / "a.parquet")
    gone = write_source(sample[8:12], base_url, folder / "b.parquet")
    with Pipeline.open(settings.model_copy(update={"shard_size": SHARD_SIZE})) as pipeline:
        pipeline.plan([str(kept), str(gone)])
        rows = pipeline.status()
    gone.unlink()
    by_source: dict[str, list[str]] = {}
    for row in rows:
        by_source.setdefault(row.source, []).append(row.shard_id)
    return by_source["a.parquet"], by_source["b.parquet"]


def _task_instances(api: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    body = ok(
        api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", params={"limit": 500})
    )
    assert body["total_entries"] == len(body["task_instances"])
    return body["task_instances"]


def _overlapping(intervals: list[tuple[datetime, datetime]]) -> list[tuple]:
    ordered = sorted(intervals)
    return [(a, b) for a, b in zip(ordered, ordered[1:], strict=False) if b[0] < a[1]]


def test_celery_workers_take_their_queues_and_a_failing_shard_fails_its_task(
    tmp_path, settings, sample, sample_site, celery_cluster
):
    stages = list(stage_registry())
    kept, gone = _plan(settings, sample, sample_site.url("").rstrip("/"), tmp_path)
    assert len(kept) == 2 and len(gone) == 1
    cluster = celery_cluster
    with client(cluster) as api:
        ok(api.post("/api/v2/pools", json={"name": "gpu", "slots": 1}), 201)

        def parsed() -> dict[str, Any] | None:
            response = api.get(f"/api/v2/dags/{DAG_ID}")
            return None if response.status_code == 404 else ok(response)

        wait(f"the dag-processor to parse {DAG_ID}", cluster, parsed, START_TIMEOUT_S)
        ok(api.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}))
        conf = {"shard_ids": kept + gone, "stages": stages}
        run = ok(
            api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
        )

        def finished() -> str | None:
            state = ok(api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}"))["state"]
            return state if state in ("success", "failed") else None

        run_state = wait(f"run {run['dag_run_id']}", cluster, finished, RUN_TIMEOUT_S)
        tis = _task_instances(api, run["dag_run_id"])

    # A task instance that never ran has no rendered map index (the shard id): key by index.
    states = {(t["task_id"], t["map_index"]): t["state"] for t in tis}
    index = {t["rendered_map_index"]: t["map_index"] for t in tis if t["map_index"] >= 0}
    report = f"{states}\n{cluster.diagnostics()}"
    assert set(index) >= {*kept, *gone}, report
    for stage in stages:
        for shard_id in kept:
            assert states[(f"process_shard.{stage}", index[shard_id])] == "success", report
    [failed] = gone
    assert states[("process_shard.fetch", index[failed])] == "failed", report
    # its source is gone: a permanent error, so one try; the run's check fails the run
    [fetch] = [
        t for t in tis if (t["task_id"], t["map_index"]) == ("process_shard.fetch", index[failed])
    ]
    assert fetch["try_number"] == 1, report
    assert states[("check", -1)] == "failed" and run_state == "failed", report
    for stage in stages[1:]:
        assert states[(f"process_shard.{stage}", index[failed])] == "upstream_failed", report
    assert states[("plan", -1)] == "success", report

    ran = [t for t in tis if t["state"] in ("success", "failed")]  # not upstream_failed
    for ti in ran:
        stage = ti["task_id"].removeprefix("process_shard.")
        worker = "gpu" if stage in GPU_STAGES else "cpu"
        where = (ti["task_id"], ti["rendered_map_index"], ti["hostname"], ti["queue"])
        assert (ti["hostname"], ti["queue"]) == (worker, WORKERS[worker]), where
        assert (ti["pool"] == "gpu") == (worker == "gpu"), (where, ti["pool"])
    gpu_runs = [
        (datetime.fromisoformat(t["start_date"]), datetime.fromisoformat(t["end_date"]))
        for t in ran
        if t["pool"] == "gpu"
    ]
    assert len(gpu_runs) == len(GPU_STAGES) * len(kept)
    assert _overlapping(gpu_runs) == [], "two tasks held the gpu pool's one slot at once"
