"""The Airflow build DAG: it imports cleanly, explains its params, and really runs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from facecaption_airflow.tasks import SHARD_LABEL
from support.sampledata import write_source

from facecaption.core.names import STAGE_NAMES
from facecaption.core.pipeline import Pipeline
from facecaption.core.stage import stage_registry

REPO = Path(__file__).resolve().parents[1]
# What parsing a DAG file must not import: every task process parses its DAG file again before
# it runs, a GPU task while it holds its `gpu` pool slot. The stages, the data and model
# libraries and our SQL load when a task body runs, in the tasks that use them. (Airflow
# itself brings SQLAlchemy, pydantic and fsspec.)
NOT_AT_PARSE = (
    "pyarrow", "pandas", "numpy", "PIL", "cv2", "onnxruntime", "torch", "transformers",
    "insightface", "aiohttp", "facecaption.state", "facecaption.core.stage",
    "facecaption.core.pipeline", "facecaption.core.store", "facecaption.plan",
    "facecaption.fetch", "facecaption.detect", "facecaption.attribute", "facecaption.caption",
    "facecaption.release", "facecaption.models",
)  # fmt: skip


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_dags_import_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {"facecaption_build", "facecaption_refresh", "facecaption_takedown"} <= set(
        dagbag.dag_ids
    )


def test_parsing_the_dags_imports_no_stage_and_no_heavy_library():
    """A module-presence check in a fresh process (not a timing): DagBag over dags/, then
    none of NOT_AT_PARSE is in sys.modules."""
    script = (
        "import json, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(REPO / 'dags')!r})\n"
        "print(json.dumps({'errors': {str(k): str(v) for k, v in bag.import_errors.items()},"
        " 'dags': sorted(bag.dag_ids), 'modules': sorted(sys.modules)}))\n"
    )
    python_path = os.pathsep.join(
        p for p in (str(REPO), str(REPO / "plugins"), os.environ.get("PYTHONPATH")) if p
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": python_path},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    parsed = json.loads(done.stdout.strip().splitlines()[-1])

    assert parsed["errors"] == {}
    assert len(parsed["dags"]) == 3
    loaded = set(parsed["modules"])
    assert "facecaption_airflow.tasks" in loaded  # the DAG files' own imports did run
    assert sorted(name for name in NOT_AT_PARSE if name in loaded) == []


def test_stage_names_the_dags_read_are_the_registrys():
    assert list(STAGE_NAMES) == list(stage_registry())


def test_build_dag_params_explain_themselves(dagbag):
    dag = dagbag.get_dag("facecaption_build")
    for name, param in dag.params.items():
        assert param.schema.get("title"), name
        assert param.description, name
    assert set(dag.params) >= {"source", "shard_ids", "force"}


def test_build_dag_maps_one_task_group_per_shard(dagbag):
    dag = dagbag.get_dag("facecaption_build")
    fetch = dag.get_task("process_shard.fetch")
    assert fetch.map_index_template == SHARD_LABEL
    assert {t.task_id for t in fetch.upstream_list} == {"plan"}
    detect = dag.get_task("process_shard.detect")
    assert "process_shard.fetch" in {t.task_id for t in detect.upstream_list}
    assert (detect.queue, detect.pool) == ("gpu", "gpu")
    attribute = dag.get_task("process_shard.attribute")
    assert "process_shard.detect" in {t.task_id for t in attribute.upstream_list}
    assert (attribute.queue, attribute.pool) == ("gpu", "gpu")
    caption = dag.get_task("process_shard.caption")
    assert "process_shard.attribute" in {t.task_id for t in caption.upstream_list}
    export = dag.get_task("process_shard.export")
    assert "process_shard.caption" in {t.task_id for t in export.upstream_list}
    assert export.queue != "gpu"
    for final in ("summary", "release"):
        upstream = {t.task_id for t in dag.get_task(final).upstream_list}
        assert "process_shard.export" in upstream, final


@pytest.mark.parametrize(
    ("backend", "queue"), [("transformers", "gpu"), ("openai", "default"), ("template", "default")]
)
def test_only_an_in_process_llm_sends_captions_to_the_gpu_queue(
    backend, queue, airflow_db, monkeypatch
):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("FACECAPTION_CAPTION__BACKEND", backend)
    caption = (
        DagBag(dag_folder=str(REPO / "dags"))
        .get_dag("facecaption_build")
        .get_task("process_shard.caption")
    )
    assert (caption.queue, caption.pool == "gpu") == (queue, queue == "gpu")


@pytest.mark.slow
def test_build_dag_fetches_every_shard_and_records_state(
    tmp_path, settings, settings_env, sample, sample_site, dagbag, monkeypatch
):
    """End to end with dag.test(): plan -> fetch -> detect -> attribute -> caption -> export per
    shard -> summary and release, state in Postgres (the offline cascade, the statistics
    attribute model and the template captions: offline stand-ins for the real models)."""
    for name, value in {**settings_env, "FACECAPTION_SHARD_SIZE": "8"}.items():
        monkeypatch.setenv(name, value)
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    dag = dagbag.get_dag("facecaption_build")

    run = dag.test(run_conf={"source": str(source), "shard_ids": [], "force": False})

    assert run.state == "success"
    with Pipeline.open(settings.model_copy(update={"shard_size": 8})) as pipeline:
        shard_ids = pipeline.select_shards([str(source)])
        assert len(shard_ids) == 3
        statuses = []
        for row in pipeline.status(shard_ids):
            fetch = row.stages["fetch"]
            assert fetch.status == "done" and fetch.attempt == 1
            assert row.stages["detect"].status == "done"
            assert row.stages["detect"].counts["images"] == fetch.counts.get("ok", 0)
            attribute = row.stages["attribute"]
            assert attribute.status == "done"
            assert attribute.counts["faces"] == row.stages["detect"].counts["faces_kept"]
            caption = row.stages["caption"]
            assert caption.status == "done"
            assert caption.counts["faces"] == attribute.counts["kept"]
            assert fetch.counts["rows"] == row.rows
            for name in ("fetch.tar", "fetch.parquet"):
                assert os.path.exists(fetch.artifacts[name]["uri"]), name
            table = pq.read_table(fetch.artifacts["fetch.parquet"]["uri"])
            statuses += table.column("status").to_pylist()
    assert statuses == [row.expected_status for row in sample]
    # the release step published the files, the manifest and the report
    release = Path(settings.artifact_root) / "release"
    manifest = json.loads((release / "manifest.json").read_text())
    assert sorted(manifest["built_from"]) == sorted(shard_ids)
    assert manifest["rows"] == sum(
        row.stages["export"].counts["released"] for row in pipeline_status(settings, shard_ids)
    )
    assert (release / "report.html").stat().st_size > 0
    for task_id in (
        "process_shard.fetch",
        "process_shard.detect",
        "process_shard.attribute",
        "process_shard.caption",
        "process_shard.export",
    ):
        mapped = [ti for ti in run.get_task_instances() if ti.task_id == task_id]
        assert sorted(ti.rendered_map_index for ti in mapped) == sorted(shard_ids)


def pipeline_status(settings, shard_ids):
    with Pipeline.open(settings.model_copy(update={"shard_size": 8})) as pipeline:
        return pipeline.status(shard_ids)


def digits_first_source(rows, base_url: str, path: Path) -> Path:
    """A source like `write_source`'s whose sha256, and so its shards' ids, begins with twelve
    decimal digits (`154072588631_000000000_000000003`: also a Python int literal, which
    templates rendered as native objects turn into an int). About 1 file in 300 is such."""
    urls = [row.url if row.path is None else f"{base_url}/{row.path}" for row in rows]
    for first in range(1000, 1_000_000, len(rows)):
        table = pa.table(
            {
                "SAMPLE_ID": pa.array(range(first, first + len(rows)), pa.int64()),
                "URL": urls,
                "TEXT": [row.caption for row in rows],
            }
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        prefix = hashlib.sha256(data).hexdigest()[:12]
        if prefix.isdigit() and prefix[0] != "0":
            path.write_bytes(data)
            return path
    raise AssertionError("no source with a digits-only id found")


@pytest.mark.slow
def test_a_shard_id_of_digits_stays_a_string_as_its_map_index(
    tmp_path, settings, settings_env, sample, sample_site, airflow_db, monkeypatch
):
    """A shard id made of digits and underscores is an int literal to Python; the mapped
    instances' labels (rendered as native objects) must still be the id, not an int that
    fails the task before its stage runs."""
    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)
    source = digits_first_source(
        sample[:3], sample_site.url("").rstrip("/"), tmp_path / "d.parquet"
    )
    from airflow.dag_processing.dagbag import DagBag

    # a DagBag of its own: dag.test() leaves a run's conf in the DAG's params (publish off)
    dag = DagBag(dag_folder=str(REPO / "dags")).get_dag("facecaption_build")

    run = dag.test(
        run_conf={"source": str(source), "shard_ids": [], "force": False, "stages": ["fetch"],
                  "publish": False}
    )  # fmt: skip

    with Pipeline.open(settings) as pipeline:
        (shard_id,) = pipeline.select_shards([str(source)])
    assert shard_id.split("_")[0].isdigit()
    assert run.state == "success"
    fetch = next(ti for ti in run.get_task_instances() if ti.task_id == "process_shard.fetch")
    assert (fetch.rendered_map_index, fetch.state) == (shard_id, "success")


@pytest.mark.slow
def test_takedown_dag_removes_a_url_and_a_sha256_from_the_release(
    tmp_path, settings, settings_env, sample, sample_site, dagbag, monkeypatch
):
    """Build with dag.test(), then a takedown run with one URL and one sha256: both leave every
    release file, the audit trail says when and what, and the next fetch skips them."""
    env = {**settings_env, "FACECAPTION_SHARD_SIZE": "8", "FACECAPTION_DETECT__MIN_FACE_PX": "40",
           "FACECAPTION_ATTRIBUTE__MIN_LABELS": "0"}  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    assert dagbag.get_dag("facecaption_build").test(run_conf={"source": str(source)}).state == (
        "success"
    )
    release = Path(settings.artifact_root) / "release"

    def released() -> list[dict]:
        manifest = json.loads((release / "manifest.json").read_text())
        return [
            row
            for entry in manifest["files"]
            for row in pq.read_table(release / entry["path"]).to_pylist()
        ]

    before = released()
    urls = sorted({row["url"] for row in before})
    assert len(urls) >= 3
    sha = next(row["image_sha256"] for row in before if row["url"] == urls[1])

    run = dagbag.get_dag("facecaption_takedown").test(
        run_conf={"urls": [urls[0]], "sha256s": [sha], "reason": "test", "requested_by": "me"}
    )

    assert run.state == "success"
    after = released()
    assert {row["face_id"] for row in after} == {
        row["face_id"] for row in before if row["url"] != urls[0] and row["image_sha256"] != sha
    }
    assert len(after) < len(before)
    from facecaption.state.takedowns import TakedownIndex

    with Pipeline.open(settings.model_copy(update={"shard_size": 8})) as pipeline:
        (audit,) = TakedownIndex(pipeline.state.engine).list()
        assert audit.urls == [urls[0]] and audit.sha256s == [sha] and audit.requested_by == "me"
        assert audit.applied_at is not None and audit.outputs["written"]
        shard_ids = pipeline.select_shards([str(source)])
        for shard_id in shard_ids:
            pipeline.run("fetch", shard_id, force=True)
        statuses = {
            (row["url"], row["status"])
            for shard_id in shard_ids
            for row in pq.read_table(
                pipeline.store.shard_path(shard_id, "fetch.parquet")
            ).to_pylist()
        }
    assert (urls[0], "taken_down") in statuses
    assert (urls[1], "taken_down") in statuses
