"""Running stages with state: no-op re-runs, force, stale fingerprints, failures, kill-safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support.sampledata import encode, write_source
from support.samplesite import Route, SampleSite

from facecaption.core.pipeline import Pipeline
from facecaption.core.store import PARTIAL_MARKER
from facecaption.core.writers import read_webdataset
from facecaption.plan.sources import SourceChangedError


@pytest.fixture
def one_shard(tmp_path, settings, sample, sample_site):
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    with Pipeline.open(settings) as pipeline:
        [shard_id] = pipeline.select_shards([str(source)])
        yield pipeline, shard_id, source


def test_rerunning_a_done_shard_is_a_no_op(one_shard):
    pipeline, shard_id, _ = one_shard
    first = pipeline.run("fetch", shard_id)
    tar = Path(first.artifacts["fetch.tar"]["uri"])
    mtime = tar.stat().st_mtime_ns
    again = pipeline.run("fetch", shard_id)
    assert (first.status, again.status) == ("done", "skipped")
    assert again.counts == first.counts and again.attempt == 1
    assert tar.stat().st_mtime_ns == mtime
    assert [e["event"] for e in pipeline.state.events(shard_id, "fetch")] == ["started", "done"]


def test_force_reruns_and_gives_the_same_outputs(one_shard):
    pipeline, shard_id, _ = one_shard
    first = pipeline.run("fetch", shard_id)
    forced = pipeline.run("fetch", shard_id, force=True)
    assert forced.status == "done" and forced.attempt == 2
    for name in ("fetch.tar", "fetch.parquet"):
        assert forced.artifacts[name]["sha256"] == first.artifacts[name]["sha256"], name


def test_changed_output_setting_makes_a_done_stage_stale(one_shard):
    pipeline, shard_id, _ = one_shard
    pipeline.run("fetch", shard_id)
    stricter = pipeline.settings.fetch.model_copy(update={"max_bytes": 100_000})
    pipeline.settings = pipeline.settings.model_copy(update={"fetch": stricter})
    rerun = pipeline.run("fetch", shard_id)
    assert rerun.status == "done" and rerun.attempt == 2
    assert rerun.counts.get("too_large", 0) > 0
    # a setting that does not change the output does not make it stale
    faster = stricter.model_copy(update={"concurrency": 3})
    pipeline.settings = pipeline.settings.model_copy(update={"fetch": faster})
    assert pipeline.run("fetch", shard_id).status == "skipped"


def test_missing_artifact_makes_a_done_stage_run_again(one_shard):
    pipeline, shard_id, _ = one_shard
    first = pipeline.run("fetch", shard_id)
    Path(first.artifacts["fetch.tar"]["uri"]).unlink()
    assert pipeline.run("fetch", shard_id).status == "done"


def test_a_stage_error_marks_the_attempt_failed_and_keeps_the_message(one_shard):
    pipeline, shard_id, source = one_shard
    source.unlink()  # a vanished source: a permanent error, with what to do
    with pytest.raises(SourceChangedError, match="file not found"):
        pipeline.run("fetch", shard_id)
    state = pipeline.state.get_stage(shard_id, "fetch")
    assert state.status == "failed" and "SourceChangedError" in state.last_error
    assert "put the file back" in state.last_error
    assert [e["event"] for e in pipeline.state.events(shard_id, "fetch")] == ["started", "failed"]
    store = pipeline.store
    assert not store.exists(store.shard_path(shard_id, "fetch.tar"))


def _slow_source(tmp_path: Path, site: SampleSite, fast: int, slow: int) -> Path:
    urls = [site.url(f"fast/{i}.png") for i in range(fast)]
    urls += [site.url(f"slow/{i}.png") for i in range(slow)]
    pq.write_table(pa.table({"url": urls}), tmp_path / "slow.parquet")
    return tmp_path / "slow.parquet"


def _slow_routes(fast: int, slow: int, trickle_s: float) -> dict[str, Route]:
    routes = {}
    for i in range(fast):
        routes[f"fast/{i}.png"] = Route(
            encode(Image.new("RGB", (40, 30), (i, 0, 0)), "PNG"), "image/png"
        )
    for i in range(slow):
        body = encode(Image.new("RGB", (40, 30), (0, i, 0)), "PNG") + b"\0" * 6000
        routes[f"slow/{i}.png"] = Route(body, "image/png", trickle_s=trickle_s)
    return routes


@pytest.mark.slow
def test_killed_fetch_leaves_no_artifact_and_the_rerun_completes(tmp_path, settings, settings_env):
    """SIGKILL mid-shard: nothing under the final names, not done; the re-run finishes and
    gives the same outputs as an uninterrupted run."""
    routes = _slow_routes(fast=6, slow=3, trickle_s=0.5)  # slow ones take ~3.5 s
    patient = settings.fetch.model_copy(update={"read_timeout_s": 5, "total_timeout_s": 30})
    settings = settings.model_copy(update={"fetch": patient})
    env = {
        **os.environ,
        **settings_env,
        "FACECAPTION_FETCH__READ_TIMEOUT_S": "5",
        "FACECAPTION_FETCH__TOTAL_TIMEOUT_S": "30",
    }
    with SampleSite(routes) as site, Pipeline.open(settings) as pipeline:
        source = _slow_source(tmp_path, site, fast=6, slow=3)
        [shard_id] = pipeline.select_shards([str(source)])
        shard_dir = Path(pipeline.store.shard_path(shard_id, ""))
        worker = subprocess.Popen(
            [sys.executable, "-m", "facecaption.cli", "run", "--shard", shard_id],
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while pipeline.state.get_stage(shard_id, "fetch").status != "running" or not any(
            PARTIAL_MARKER in p.name for p in (shard_dir.glob("*") if shard_dir.exists() else [])
        ):
            assert time.monotonic() < deadline, "the worker never started fetching"
            assert worker.poll() is None, "the worker finished before it could be killed"
            time.sleep(0.05)
        time.sleep(0.5)  # the fast images are in the spool by now
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()

        assert not (shard_dir / "fetch.tar").exists()
        assert not (shard_dir / "fetch.parquet").exists()
        assert pipeline.state.get_stage(shard_id, "fetch").status == "running"  # abandoned

        rerun = pipeline.run("fetch", shard_id)
        assert rerun.status == "done" and rerun.attempt == 2
        assert not [p for p in shard_dir.iterdir() if PARTIAL_MARKER in p.name]
        events = [e["event"] for e in pipeline.state.events(shard_id, "fetch")]
        assert events == ["started", "abandoned", "started", "done"]

        reference = tmp_path / "reference"
        clean = settings.model_copy(update={"store_root": str(reference)})
        with Pipeline.open(clean) as other:
            # same DB, other store: force so that it really fetches again
            uninterrupted = other.run("fetch", shard_id, force=True)
    assert uninterrupted.artifacts["fetch.tar"]["sha256"] == rerun.artifacts["fetch.tar"]["sha256"]
    killed_then_rerun = pq.read_table(rerun.artifacts["fetch.parquet"]["uri"])
    assert pq.read_table(uninterrupted.artifacts["fetch.parquet"]["uri"]).equals(killed_then_rerun)
    with open(rerun.artifacts["fetch.tar"]["uri"], "rb") as handle:
        assert len(read_webdataset(handle)) == 9
