"""Airflow's own cost per shard, side by side in one run: the build DAG on a live Airflow 3
with the LocalExecutor (api-server, scheduler and dag-processor as separate processes, as
tests/test_airflow_live.py runs them; triggered through the REST API) over N shards whose
stages have next to nothing to do (one row each, a URL that is not fetchable), against
`facecaption run` on the same shards in one command; then that difference per shard as a
share of a realistic 10,000-row shard's CPU work, from the per-item CPU costs measured in the
fetch and detection sections of docs/benchmarks.md (arguments, so that they can follow them).

    python bench/bench_airflow_overhead.py --shards 10

It prints its figures; docs/benchmarks.md has them from `bench/bench_scale.py` (part 3 of its
"Scale" section), which runs this beside the other scale measurements.

Needs the local Postgres (`--admin-url`); creates and drops its own databases.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa
from bench_scale import ADMIN_URL, throwaway_db
from sqlalchemy.engine import make_url
from support.airflow_cluster import BIN, REPO, START_TIMEOUT_S, AirflowCluster, airflow_environment
from support.statistics_model import build_statistics_model
from test_airflow_live import (
    DAG_ID,
    _client,
    _free_port,
    _ok,
    _task_instances,
    _trigger,
    _wait,
)

from facecaption.settings import Settings

PARALLELISM = 2  # Airflow's task slots, and the CLI's --jobs: the same two workers
RUN_TIMEOUT_S = 1800  # a loaded 2-core machine runs a task instance every few seconds


def write_empty_source(path: Path, shards: int) -> Path:
    """One row per shard, each URL one that fetch rejects without a request."""
    table = pa.table(
        {
            "SAMPLE_ID": pa.array(range(shards), pa.int64()),
            "URL": [f"not-a-url-{i}" for i in range(shards)],
            "TEXT": [f"row {i}" for i in range(shards)],
        }
    )
    pq.write_table(table, path)
    return path


def settings_env(tmp: Path, name: str, db_url: str, model: Path) -> dict[str, str]:
    settings = Settings(
        home=tmp / name / "home",
        db_url=db_url,
        store_root=str(tmp / name / "artifacts"),
        shard_size=1,
        detect={"backend": "cascade"},
        attribute={"model_path": str(model)},
        caption={"backend": "template"},
    )
    from support.processes import settings_environment

    return settings_environment(settings)


def run_cli(source: Path, env: dict[str, str]) -> float:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("FACECAPTION_")}, **env}
    full["PYTHONPATH"] = str(REPO)
    start = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "facecaption"), "run", "--source", str(source), "--jobs", str(PARALLELISM)],
        env=full,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"facecaption run failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def run_airflow(source: Path, env: dict[str, str], tmp: Path, admin_url: str) -> dict:
    """Start the cluster, wait until the DAG is parsed, then time one triggered build run
    (`publish` off, as the CLI's run does not publish) from the trigger to its end."""
    import secrets

    home = tmp / "airflow"
    home.mkdir()
    port = _free_port()
    password = secrets.token_urlsafe(12)
    with empty_db(admin_url) as url:
        # tests/test_airflow_live.py's cluster: LocalExecutor, Postgres metadata
        full = airflow_environment(
            home, port, url.render_as_string(hide_password=False), password,
            core__executor="LocalExecutor", core__parallelism=str(PARALLELISM),
        )  # fmt: skip
        full.update(env)
        full["PYTHONPATH"] = str(REPO)
        cluster = AirflowCluster(home, full, port, password)
        migrate = cluster.airflow("db", "migrate", timeout=START_TIMEOUT_S)
        if migrate.returncode:
            raise RuntimeError(f"airflow db migrate: {migrate.stderr[-2000:]}")
        try:
            cluster.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(port))
            cluster.start("dag-processor", "dag-processor")
            cluster.start("scheduler", "scheduler", "--skip-serve-logs")
            with _client(cluster) as api:
                _ok(api.post("/api/v2/pools", json={"name": "gpu", "slots": 2}), 201)

                def parsed() -> bool:
                    return api.get(f"/api/v2/dags/{DAG_ID}").status_code == 200

                _wait(f"{DAG_ID} parsed", cluster, parsed, START_TIMEOUT_S)
                _ok(api.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}))
                start = time.perf_counter()
                run_id = _trigger(api, {"source": str(source), "publish": False})

                def finished() -> str | None:
                    state = _ok(api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}"))["state"]
                    return state if state in ("success", "failed") else None

                state = _wait(f"run {run_id}", cluster, finished, RUN_TIMEOUT_S)
                seconds = time.perf_counter() - start
                tis = _task_instances(api, run_id)
                if state != "success":
                    raise RuntimeError(f"run {state}: {[(t['task_id'], t['state']) for t in tis]}")
        finally:
            cluster.stop()
    parses = [
        float(found)
        for path in (home / "logs").glob("dag_id=*/**/*.log")
        for found in re.findall(r'"dag_file_parse_ms":\s*([0-9.]+)', path.read_text())
    ]
    durations = [t["duration"] for t in tis if t["duration"] is not None]
    waits = [
        (_when(t["start_date"]) - _when(t["queued_when"])).total_seconds()
        for t in tis
        if t["start_date"] and t["queued_when"]
    ]
    nan = float("nan")
    return {"seconds": seconds, "tis": len(tis), "duration_median": statistics.median(durations),
            "wait_median": statistics.median(waits) if waits else nan,
            "parse_median": statistics.median(parses) / 1000 if parses else nan}  # fmt: skip


@contextmanager
def empty_db(admin_url: str) -> Iterator[sa.URL]:
    """A database with no schema: Airflow's metadata."""
    name = f"fc_bench_af_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(drivername="postgresql+psycopg2", database=name)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# Per-item CPU costs from this page's other sections (arguments, so that they can follow them).
FETCH_CPU_PER_1000 = 3.41  # fetch CPU s per 1,000 images kept (Fetch vs img2dataset)
KEPT_SHARE = 0.84  # share of rows fetched (Fetch vs img2dataset: 4190 of 5000)
DETECT_CPU_PER_IMAGE = 0.266  # detect stage CPU s per image on CPU (Face detection)


def measure_overhead(tmp: Path, shards: int, admin_url: str) -> dict[str, Any]:
    """The CLI's seconds and the Airflow run's figures over the same `shards` empty shards."""
    model = build_statistics_model(tmp / "statistics.onnx")
    source = write_empty_source(tmp / "empty.parquet", shards)
    with throwaway_db(admin_url) as cli_db:
        cli_s = run_cli(source, settings_env(tmp, "cli", cli_db, model))
    with throwaway_db(admin_url) as airflow_db:
        airflow = run_airflow(
            source, settings_env(tmp, "airflow", airflow_db, model), tmp, admin_url
        )
    return {"shards": shards, "cli_s": cli_s, "airflow": airflow}


def overhead_lines(
    measured: dict[str, Any],
    fetch_cpu_per_1000: float = FETCH_CPU_PER_1000,
    kept_share: float = KEPT_SHARE,
    detect_cpu_per_image: float = DETECT_CPU_PER_IMAGE,
) -> list[str]:
    """What the page says of a `measure_overhead`: the setup, the table, the shares."""
    shards, cli_s, airflow = measured["shards"], measured["cli_s"], measured["airflow"]
    per_shard = (airflow["seconds"] - cli_s) / shards
    rows = 10_000
    fetch_cpu = rows * kept_share * fetch_cpu_per_1000 / 1000
    detect_cpu = rows * kept_share * detect_cpu_per_image
    return [
        f"{shards} shards of one row each (a URL fetch rejects without a request: every"
        " stage runs and has next to nothing to do), every stage, no release. Airflow: the"
        " build DAG on Airflow 3.3 with the LocalExecutor (api-server, scheduler, dag-processor;"
        f" parallelism {PARALLELISM}, metadata in Postgres), timed from the REST trigger to the"
        f" run's end, the DAG already parsed. CLI: `facecaption run --source --jobs"
        f" {PARALLELISM}` in one process tree, from a fresh state database.",
        "",
        "| | seconds | per shard s | vs CLI |",
        "|---|---:|---:|---:|",
        f"| `facecaption run` | {cli_s:.1f} | {cli_s / shards:.2f} | 1.0x |",
        f"| Airflow build run ({airflow['tis']} task instances) | {airflow['seconds']:.1f} |"
        f" {airflow['seconds'] / shards:.2f} | {airflow['seconds'] / cli_s:.1f}x |",
        "",
        f"Airflow's task instances: median duration {airflow['duration_median']:.1f} s (the"
        " task process: start, DAG parse, the stage's own near-zero work), median"
        f" {airflow['wait_median']:.1f} s from queued to started; of a task's time, parsing the"
        f" DAG file in the task process took {airflow['parse_median']:.1f} s (median of the"
        " task logs' `dag_file_parse_ms`). Airflow's own cost:"
        f" **{per_shard:.1f} s per shard** (5 task instances) over the CLI's.",
        "",
        f"As a share of a realistic 10,000-row shard ({kept_share:.0%} of rows fetched),"
        " from this page's other sections: fetch alone costs about"
        f" {fetch_cpu:.0f} CPU s ({fetch_cpu_per_1000} CPU s per 1,000 images), so the"
        f" overhead is {per_shard / fetch_cpu:.0%} of it; with detection on this CPU"
        f" ({detect_cpu_per_image} CPU s per image, {detect_cpu:.0f} s) it is"
        f" {per_shard / (fetch_cpu + detect_cpu):.1%} of the shard's work. These shares set"
        " wall seconds on an oversubscribed machine against CPU seconds: read them as upper"
        " bounds. The cost is per task instance (process start, the DAG file parsed again,"
        " scheduling), so it does not grow with a shard's rows: bigger shards, a shard's GPU"
        " stages in one task, or a long-lived model server (the compose file's `vllm`) cut its"
        " share; on a GPU, where detection is many times faster, it weighs more.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    parser.add_argument("--fetch-cpu-per-1000", type=float, default=FETCH_CPU_PER_1000)
    parser.add_argument("--kept-share", type=float, default=KEPT_SHARE)
    parser.add_argument("--detect-cpu-per-image", type=float, default=DETECT_CPU_PER_IMAGE)
    args = parser.parse_args()

    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fc-bench-airflow-") as tmp_name:
        measured = measure_overhead(Path(tmp_name), args.shards, args.admin_url)
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work (load"
        f" average {os.getloadavg()[0]:.1f} at the end), Python {platform.python_version()},"
        f" PostgreSQL on loopback. Whole run {(time.perf_counter() - wall) / 60:.1f} min."
        " Absolute seconds move with the load (other jobs ran on the same two cores); read the"
        " ratio.",
        "",
        *overhead_lines(
            measured, args.fetch_cpu_per_1000, args.kept_share, args.detect_cpu_per_image
        ),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
