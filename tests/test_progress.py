"""What `facecaption run` shows while it works: live lines per shard on a terminal (a real
pseudo-terminal), a line per finished stage elsewhere, and the running counts stages report."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys

from support.sampledata import write_source

from facecaption.core.pipeline import Pipeline, run_shard
from facecaption.core.progress import LineProgress, ProgressEvent, TerminalProgress


def test_terminal_view_redraws_running_shards_and_keeps_finished_ones():
    out = io.StringIO()
    view = TerminalProgress(out, ["fetch", "detect", "caption"])
    view(ProgressEvent("s1", "fetch", {"rows": 10, "done": 4, "ok": 3}))
    view(ProgressEvent("s2", "fetch", {"rows": 10, "done": 1, "ok": 1}))
    view(ProgressEvent("s1", "fetch", {"rows": 10, "ok": 8}, status="done"))
    view(ProgressEvent("s1", "detect", {"images": 8, "faces_kept": 5}, status="done"))
    view(ProgressEvent("s2", "fetch", {}, status="failed", error="boom"))
    view(ProgressEvent("s1", "caption", {"faces": 4}, status="done", warnings=["w"]))
    view.close()
    text = out.getvalue()
    assert "s1  [fetch] rows 4/10, ok 3" in text and "s2  [fetch] rows 1/10, ok 1" in text
    assert "s2  failed at fetch: boom" in text
    assert "s1  done: rows 10/10, ok 8, faces 5, captions 4" in text
    assert "s1  warning: w" in text
    assert "\x1b[" in text  # redrawn in place
    assert text.endswith("\x1b[J")  # the live block is cleared at the end
    assert (view.finished, view.failed) == (1, 1)


def test_line_view_prints_one_line_per_finished_stage():
    out = io.StringIO()
    view = LineProgress(out)
    view(ProgressEvent("s1", "fetch", {"rows": 10, "done": 4}))
    view(ProgressEvent("s1", "fetch", {"rows": 10, "ok": 8}, status="done"))
    view(ProgressEvent("s1", "detect", {}, status="failed", error="ModelNotFoundError: x"))
    assert out.getvalue().splitlines() == [
        's1 fetch: done {"rows": 10, "ok": 8}',
        "s1 detect: failed: ModelNotFoundError: x",
    ]


def test_stages_report_running_counts(tmp_path, settings, sample, sample_site):
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    with Pipeline.open(settings) as pipeline:
        [shard_id, *_] = pipeline.select_shards([str(source)])
    events: list[ProgressEvent] = []
    result = run_shard(settings, shard_id, ["fetch", "detect"], False, progress=events.append)
    assert result.error is None
    fetch_live = [e for e in events if e.stage == "fetch" and e.status is None]
    assert fetch_live and all(0 < e.counts["done"] <= e.counts["rows"] for e in fetch_live)
    finals = [(e.stage, e.status) for e in events if e.status is not None]
    assert finals == [("fetch", "done"), ("detect", "done")]
    detect_live = [e for e in events if e.stage == "detect" and e.status is None]
    assert detect_live and detect_live[0].counts["images"] >= 1


def test_a_stage_held_by_another_worker_ends_the_live_line_as_busy_not_failed(
    tmp_path, settings, sample, sample_site
):
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    events: list[ProgressEvent] = []
    with Pipeline.open(settings) as pipeline:
        [shard_id, *_] = pipeline.select_shards([str(source)])
        with pipeline.state.claim(shard_id, "fetch"):  # another worker holds it
            result = run_shard(
                settings, shard_id, ["fetch", "detect"], False, progress=events.append
            )
    assert result.busy and result.busy.startswith("fetch: ") and result.error is None
    assert [(e.stage, e.status) for e in events] == [("fetch", "busy")]
    out = io.StringIO()
    view = TerminalProgress(out, ["fetch", "detect"])
    view(ProgressEvent(shard_id, "fetch", {"rows": 10, "done": 1, "ok": 1}))
    view(events[0])
    # redrawn without its live line
    assert out.getvalue().rsplit("shards: ", 1)[-1] == "0 done, 0 failed, 0 running\n"
    assert (view.finished, view.failed) == (0, 0) and "failed at" not in out.getvalue()
    lines = io.StringIO()
    LineProgress(lines)(events[0])
    assert lines.getvalue() == ""  # `run` says it on stderr, with what it does next


def test_run_on_a_terminal_shows_live_progress(tmp_path, settings_env, sample, sample_site):
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    env = {**os.environ, **settings_env, "FACECAPTION_SHARD_SIZE": "10"}
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "facecaption.cli", "run", "--source", str(source)],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    output = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 300)
        if not ready:
            process.kill()
            break
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal's other end closed: the process is gone
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert process.wait(timeout=60) == 0, output.decode(errors="replace")
    text = output.decode()
    assert "\x1b[" in text and "shards: " in text  # the live block
    assert text.count(" done: rows ") == 3  # a line per finished shard
    assert "fetch: 3 done;" in text and "caption: 3 done" in text  # a summary per stage
