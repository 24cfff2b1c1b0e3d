"""Workers at the same time, as real processes: a worker cut off from Postgres by a restart
publishes nothing once another took its stage over, a forced fetch leaves a running detect
alone, two `run` processes over the same shards share the work and both say it is done, and
`run --jobs` passes `--retry-transient` on."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from PIL import Image
from support.processes import sessions_waiting_on, settings_environment, start_cli
from support.sampledata import encode, write_source
from support.samplesite import Route, SampleSite
from support.throwaway_postgres import ThrowawayPostgres, server_binaries
from test_fetch_web import png, urls_source, wait_for

from facecaption.cli import EXIT_BUSY, main
from facecaption.core.pipeline import Pipeline
from facecaption.core.store import PARTIAL_MARKER, sha256_file
from facecaption.state.db import upgrade


def patient(settings, **changes):
    """Fetch timeouts long enough for a request the test holds back on purpose."""
    fetch = settings.fetch.model_copy(update={"read_timeout_s": 60, "total_timeout_s": 120})
    return settings.model_copy(update={"fetch": fetch, **changes})


def use_settings(monkeypatch, settings) -> None:
    """The CLI in this process (`main`) reads these settings from the environment."""
    for name, value in settings_environment(settings).items():
        monkeypatch.setenv(name, value)


def noise_png(seed: int, side: int = 120) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


def finish(process: subprocess.Popen, timeout_s: float = 300) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def event_names(pipeline: Pipeline, shard_ids: list[str]) -> dict[tuple[str, str], list[str]]:
    """(shard, stage) -> its events, oldest first."""
    names: dict[tuple[str, str], list[str]] = {}
    for shard_id in shard_ids:
        for event in pipeline.state.events(shard_id):
            names.setdefault((shard_id, event["stage"]), []).append(event["event"])
    return names


@pytest.mark.slow
@pytest.mark.skipif(server_binaries() is None, reason="no Postgres server binaries to start")
def test_a_worker_cut_off_by_a_postgres_restart_publishes_nothing_after_a_takeover(
    tmp_path, settings
):
    """Worker A fetches; Postgres restarts (A's session and its lock are gone); worker B takes
    the stage over. A then finishes its downloads but must not publish over B's outputs, and
    records its own failure. A keeps small images only, so its outputs would differ."""
    gate = threading.Event()  # held.png answers only when both workers asked for it
    routes = {
        "small.png": Route(png(1), "image/png"),
        "large.png": Route(noise_png(0), "image/png"),  # over A's max_bytes
        "held.png": Route(png(2), "image/png", hold=gate),
    }
    with ThrowawayPostgres() as server, SampleSite(routes) as site:
        db_url = server.create_database("facecaption")
        engine = sa.create_engine(db_url)
        upgrade(engine)
        engine.dispose()
        settings = patient(settings, db_url=db_url)
        workers: list[subprocess.Popen] = []
        try:
            with Pipeline.open(settings) as pipeline:
                source = urls_source(tmp_path, [site.url(path) for path in routes])
                [shard] = pipeline.select_shards([str(source)])
                args = ["run", "--shard", shard, "--stage", "fetch"]
                a = start_cli(
                    args,
                    settings,
                    FACECAPTION_FETCH__MAX_BYTES="10000",
                    FACECAPTION_BUSY_WAIT_S="0",
                )
                workers.append(a)
                assert wait_for(lambda: site.hits.get("held.png") == 1, 60), "A never fetched"
                assert pipeline.state.get_stage(shard, "fetch").status == "running"

                server.restart()  # for real: every session ends, A's lock with it

                b = start_cli(args, settings)
                workers.append(b)
                assert wait_for(lambda: site.hits.get("held.png") == 2, 60), "B never fetched"
                gate.set()
                a_out, a_err = finish(a)
                b_out, b_err = finish(b)
                state = pipeline.state.get_stage(shard, "fetch")
                events = pipeline.state.events(shard, "fetch")
                folder = Path(pipeline.store.shard_folder(shard))
        finally:
            gate.set()
            for worker in workers:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGKILL)
    assert b.returncode == 0, b_err
    assert a.returncode == EXIT_BUSY, a_err
    assert "taken over by attempt 2" in a_err
    assert (state.status, state.attempt, state.worker.rsplit(":", 1)[1]) == ("done", 2, str(b.pid))
    assert [(e["attempt"], e["event"]) for e in events if e["attempt"] == 2] == [
        (2, "started"),
        (2, "done"),
    ]
    first = [e for e in events if e["attempt"] == 1]
    assert [e["event"] for e in first] == ["started", "abandoned", "failed"]
    assert first[2]["error"].startswith("AttemptTakenOverError: fetch of shard")
    assert first[2]["worker"].endswith(f":{a.pid}")
    # the files are B's, as recorded: A kept large.png out, B kept it
    for name, ref in state.artifacts.items():
        assert sha256_file(folder / name) == ref["sha256"], name
    rows = {
        r["url"].rsplit("/", 1)[1]: r for r in pq.read_table(folder / "fetch.parquet").to_pylist()
    }
    assert rows["large.png"]["status"] == "ok"
    assert not [p for p in folder.iterdir() if PARTIAL_MARKER in p.name]


@pytest.mark.slow
def test_a_forced_fetch_leaves_a_running_detect_alone(tmp_path, settings, sample, sample_site):
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    with Pipeline.open(settings) as pipeline:
        [shard] = pipeline.select_shards([str(source)])
        first = pipeline.run("fetch", shard)
        folder = Path(pipeline.store.shard_folder(shard))
        # what a killed earlier fetch attempt would have left: the forced one removes it
        leftover = folder / f".fetch.tar{PARTIAL_MARKER}fetch-1-{'0' * 32}"
        leftover.write_bytes(b"half a tar")

        def detect_writing() -> bool:
            return any(PARTIAL_MARKER + "detect-" in p.name for p in folder.iterdir())

        detect = start_cli(["run", "--shard", shard, "--stage", "detect"], settings)
        try:
            assert wait_for(lambda: detect_writing() or detect.poll() is not None, 120)
            os.killpg(detect.pid, signal.SIGSTOP)  # paused halfway through its outputs
            assert detect.poll() is None and detect_writing(), "detect ended before the pause"
            forced = pipeline.run("fetch", shard, force=True)
            assert detect_writing()
        finally:
            os.killpg(detect.pid, signal.SIGCONT)
        _, err = finish(detect)
        state = pipeline.state.get_stage(shard, "detect")
    assert detect.returncode == 0, err
    assert (state.status, state.attempt) == ("done", 1)
    assert forced.attempt == 2 and not leftover.exists()
    assert forced.artifacts == first.artifacts  # the same outputs: detect is not stale
    assert not [p for p in folder.iterdir() if PARTIAL_MARKER in p.name]


@pytest.mark.slow
def test_two_run_processes_over_the_same_shards_share_the_work_and_both_end_done(
    tmp_path, settings
):
    routes = {f"{i}.png": Route(png(i), "image/png", trickle_s=0.05) for i in range(9)}
    with SampleSite(routes) as site:
        settings = patient(settings, shard_size=3)
        with Pipeline.open(settings) as pipeline:
            shard_ids = pipeline.select_shards(
                [str(urls_source(tmp_path, [site.url(p) for p in routes]))]
            )
            args = ["run", "--stage", "fetch", "--stage", "detect"]
            # the first shard is busy elsewhere when both start: each does the others, then
            # both wait for it
            with pipeline.state.claim(shard_ids[0], "fetch"):
                runs = [start_cli(args, settings), start_cli(args, settings)]
                assert wait_for(
                    lambda: sessions_waiting_on(pipeline.state.engine, "pg_advisory_lock") == 2,
                    120,
                ), "the runs never waited for the busy shard"
            outputs = [finish(run) for run in runs]
            events = event_names(pipeline, shard_ids)
    for run, (_, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err
        assert f"{shard_ids[0]} fetch: fetch of shard {shard_ids[0]} is running elsewhere" in err
    assert set(events) == {(s, stage) for s in shard_ids for stage in ("fetch", "detect")}
    assert all(names == ["started", "done"] for names in events.values()), events


def test_run_says_when_work_is_still_busy_elsewhere(tmp_path, settings, monkeypatch, capsys):
    routes = {f"{i}.png": Route(png(i), "image/png") for i in range(4)}
    with (
        SampleSite(routes) as site,
        Pipeline.open(settings.model_copy(update={"shard_size": 2})) as pipeline,
    ):
        shard_ids = pipeline.select_shards(
            [str(urls_source(tmp_path, [site.url(p) for p in routes]))]
        )
        use_settings(monkeypatch, pipeline.settings.model_copy(update={"busy_wait_s": 0.2}))
        with pipeline.state.claim(shard_ids[1], "fetch"):
            assert main(["run", "--stage", "fetch"]) == EXIT_BUSY
        err = capsys.readouterr().err
        assert f"{shard_ids[1]} fetch: fetch of shard {shard_ids[1]} is running elsewhere" in err
        assert "still busy after waiting 0.2 s" in err
        assert pipeline.state.get_stage(shard_ids[0], "fetch").status == "done"
        assert main(["run", "--stage", "fetch"]) == 0  # free now: it runs, and all is done


def test_run_with_jobs_retries_transient_rows_in_the_worker_processes(
    tmp_path, settings, monkeypatch, capsys
):
    failing_first = settings.fetch.retries + 1  # every try of the first run fails
    routes = {
        "ok.png": Route(png(1), "image/png"),
        "flaky.png": Route(png(2), "image/png", fail_first=failing_first, fail_status=500),
        "other.png": Route(png(3), "image/png"),
        "more.png": Route(png(4), "image/png"),
    }
    with (
        SampleSite(routes) as site,
        Pipeline.open(settings.model_copy(update={"shard_size": 2})) as pipeline,
    ):
        shard_ids = pipeline.select_shards(
            [str(urls_source(tmp_path, [site.url(p) for p in routes]))]
        )
        for shard_id in shard_ids:
            pipeline.run("fetch", shard_id)
        assert pipeline.state.get_stage(shard_ids[0], "fetch").counts["retryable"] == 1
        use_settings(monkeypatch, pipeline.settings)
        args = ["run", "--stage", "fetch", "--jobs", "2", "--retry-transient"]
        assert main(args) == 0, capsys.readouterr().err
        flaky, steady = (pipeline.state.get_stage(s, "fetch") for s in shard_ids)
    assert (flaky.attempt, flaky.counts["retryable"], flaky.counts["ok"]) == (2, 0, 2)
    assert steady.attempt == 1  # nothing to retry there
    assert site.hits["flaky.png"] == failing_first + 1 and site.hits["ok.png"] == 1
