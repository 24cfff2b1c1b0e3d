"""Per-face retry budget across runs: a face whose LLM request met a transient fault (here a
503 on every attempt) is asked for again by a later run only once its pause has passed
(doubling with each run), and after `caption.face_max_runs` runs it is final
(`gave_up_server_error`, the grammar's text as its caption). A refresh in between has nothing
to do, and the other faces are never asked again. A real OpenAI-compatible server over
loopback, real Postgres.

Time passing is the state DB's record of it moving back: the pauses are an hour and more, and
a test waits for none of them.
"""

from __future__ import annotations

from datetime import timedelta

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from conftest import REPO
from support.chatserver import ChatServer, Fault
from support.processes import settings_environment
from test_caption import attributed_shard_notes
from test_fetch_retry_budget import mapped_shards, time_passes

from facecaption.core.pipeline import Pipeline, run_shards
from facecaption.core.status import format_status, status_json
from facecaption.settings import CaptionSettings, Settings
from facecaption.state.retries import RowRetryLedger

PAUSE_S = 3600
MAX_RUNS = 3


def faithful(messages: list[dict]) -> str:
    """Every face's notes, back as its caption: passes the fidelity check."""
    return messages[1]["content"].split("Notes: ", 1)[1]


class FlakyServer(ChatServer):
    """A chat server that answers 503 for the faces whose notes are in `down`."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        super().__init__(faithful, fault=self._fault)

    def _fault(self, number: int, body: dict) -> Fault | None:
        return Fault(status=503) if faithful(body["messages"]) in self.down else None


@pytest.fixture
def shard(tmp_path, settings):
    """(settings, shard id, raw notes of each kept face in face_id order): attributed."""
    return attributed_shard_notes(tmp_path, settings)


@pytest.fixture
def server():
    with FlakyServer() as served:
        yield served


def with_budget(settings: Settings, server: ChatServer, **budget: object) -> Settings:
    caption = CaptionSettings(
        backend="openai",
        base_url=server.base_url,
        server_model="echo",
        retries=0,
        face_max_runs=MAX_RUNS,
        face_retry_pause_s=PAUSE_S,
        **budget,
    )
    return settings.model_copy(update={"caption": caption})


def captions(pipeline: Pipeline, shard_id: str) -> list[dict]:
    state = pipeline.state.get_stage(shard_id, "caption")
    rows = pq.read_table(state.artifacts["captions.parquet"]["uri"]).to_pylist()
    return sorted(rows, key=lambda row: row["face_id"])


def work(pipeline: Pipeline) -> list[str]:
    return pipeline.select_work(status="work").shard_ids


def refresh(pipeline: Pipeline, shard_id: str):
    """What the refresh DAG does for a shard it maps: every stage, retrying due work; the
    caption stage's outcome."""
    outcomes = {
        stage: pipeline.run(stage, shard_id, retry_transient=True) for stage in pipeline.stage_names
    }
    return outcomes["caption"]


def test_a_failing_face_waits_longer_each_run_then_gives_up(shard, server):
    settings, shard_id, notes = shard
    server.down = {notes[1]}  # one face's requests fail on every run
    with Pipeline.open(with_budget(settings, server)) as pipeline:
        ledger = RowRetryLedger(pipeline.state.engine, "caption")
        first = refresh(pipeline, shard_id)
        assert (first.counts["asked"], first.counts["retryable"]) == (4, 1)
        assert first.counts["rewrite_server_error"] == 1
        before = captions(pipeline, shard_id)
        target = before[1]["face_id"]
        waiting = ledger.rows(shard_id)
        assert list(waiting) == [target] and waiting[target].runs == 1
        assert waiting[target].due_at - waiting[target].tried_at == timedelta(seconds=PAUSE_S)
        assert pipeline.state.get_stage(shard_id, "caption").retry_at == waiting[target].due_at

        # a refresh right after has nothing to do: no shard is work, no stage runs
        requests = server.count
        assert work(pipeline) == []
        assert pipeline.select_work(status="retryable").shard_ids == []
        assert pipeline.run("caption", shard_id, retry_transient=True).status == "skipped"
        time_passes(pipeline, shard_id, timedelta(seconds=PAUSE_S - 60))
        assert work(pipeline) == []  # a minute to go
        assert server.count == requests

        # once the pause has passed, the shard is work again and only that face is asked
        time_passes(pipeline, shard_id, timedelta(seconds=120))
        assert work(pipeline) == [shard_id]
        second = refresh(pipeline, shard_id)
        assert (second.attempt, second.counts["asked"], second.counts["retryable"]) == (2, 1, 1)
        assert server.count == requests + 1
        assert captions(pipeline, shard_id) == before  # the neighbours' rows as they were
        assert ledger.rows(shard_id)[target].runs == 2
        time_passes(pipeline, shard_id, timedelta(seconds=PAUSE_S + 60))
        assert work(pipeline) == []  # the pause doubled

        # the run that spends the budget makes the face final: the grammar's text, and why
        time_passes(pipeline, shard_id, timedelta(seconds=PAUSE_S))
        assert work(pipeline) == [shard_id]
        third = refresh(pipeline, shard_id)
        assert (third.counts["asked"], third.counts["retryable"], third.counts["gave_up"]) == (
            1,
            0,
            1,
        )
        assert third.counts["rewrite_gave_up_server_error"] == 1
        assert "rewrite_server_error" not in third.counts
        state = pipeline.state.get_stage(shard_id, "caption")
        assert state.retry_at is None and ledger.rows(shard_id) == {}
        rows = captions(pipeline, shard_id)
        gave_up = rows[1]
        assert gave_up["rewrite_error"] == "gave_up_server_error"
        assert (gave_up["caption"], gave_up["caption_source"], gave_up["fidelity"]) == (
            gave_up["raw_text"],
            "template",
            "fallback",
        )
        assert [r for i, r in enumerate(rows) if i != 1] == [
            r for i, r in enumerate(before) if i != 1
        ]
        assert [r["fidelity"] for i, r in enumerate(rows) if i != 1] == ["pass"] * 3

        # from then on nothing is work, however long it waits, and a re-run changes nothing
        assert work(pipeline) == []
        time_passes(pipeline, shard_id, timedelta(days=365))
        assert work(pipeline) == []
        requests = server.count
        assert pipeline.run("caption", shard_id, retry_transient=True).status == "skipped"
        again = pipeline.run("caption", shard_id, force=True)
        assert again.counts["asked"] == 0 and server.count == requests
        assert (
            again.artifacts["captions.parquet"]["sha256"]
            == state.artifacts["captions.parquet"]["sha256"]
        )
        assert "llm, 1 gave up" in format_status(pipeline.status([shard_id]))


def test_a_face_asked_again_after_its_pause_gets_its_caption(shard, server):
    settings, shard_id, notes = shard
    server.down = {notes[0], notes[3]}
    with Pipeline.open(with_budget(settings, server)) as pipeline:
        first = pipeline.run("caption", shard_id)
        assert first.counts["retryable"] == 2
        before = captions(pipeline, shard_id)
        # only the first face's pause has passed (the stage's first due moment with it)
        with pipeline.state.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE row_retries SET due_at = now() - interval '1 minute'"
                    " WHERE shard_id = :s AND stage = 'caption' AND key = :k"
                ),
                {"s": shard_id, "k": before[0]["face_id"]},
            )
            conn.execute(
                sa.text(
                    "UPDATE shard_stages SET retry_at = now() - interval '1 minute'"
                    " WHERE shard_id = :s AND stage = 'caption'"
                ),
                {"s": shard_id},
            )
        server.down = set()  # the server is back
        outcome = pipeline.run("caption", shard_id, retry_transient=True)
        assert (outcome.counts["asked"], outcome.counts["retryable"]) == (1, 1)
        rows = captions(pipeline, shard_id)
        assert (rows[0]["fidelity"], rows[0]["rewrite_error"]) == ("pass", None)
        assert rows[1:] == before[1:]  # the pausing face too: left alone, not due
        waiting = RowRetryLedger(pipeline.state.engine, "caption").rows(shard_id)
        assert list(waiting) == [rows[3]["face_id"]] and waiting[rows[3]["face_id"]].runs == 1
        state = pipeline.state.get_stage(shard_id, "caption")
        assert state.retry_at == waiting[rows[3]["face_id"]].due_at
        assert (
            status_json(pipeline.status([shard_id]))["shards"][0]["stages"]["caption"]["retry_at"]
            == state.retry_at.isoformat()
        )


def test_a_forced_run_does_not_wait_but_counts(shard, server):
    settings, shard_id, notes = shard
    server.down = {notes[2]}
    with Pipeline.open(with_budget(settings, server)) as pipeline:
        pipeline.run("caption", shard_id)
        requests = server.count
        forced = pipeline.run("caption", shard_id, force=True)
        assert (forced.counts["asked"], forced.counts["retryable"]) == (1, 1)
        assert server.count == requests + 1
        [retry] = RowRetryLedger(pipeline.state.engine, "caption").rows(shard_id).values()
        assert retry.runs == 2
        # a fresh run asks for every face again, and starts the budget over
        fresh = pipeline.run("caption", shard_id, force=True, fresh=True)
        assert fresh.counts["asked"] == 4
        [retry] = RowRetryLedger(pipeline.state.engine, "caption").rows(shard_id).values()
        assert retry.runs == 1


@pytest.fixture(scope="module")
def refresh_dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag("facecaption_refresh")


@pytest.mark.slow
def test_the_refresh_dag_maps_no_shard_while_a_face_is_pausing(
    shard, server, refresh_dag, monkeypatch
):
    settings, shard_id, notes = shard
    server.down = {notes[1]}
    settings = with_budget(settings, server)
    with Pipeline.open(settings) as pipeline:
        for stage in pipeline.stage_names:
            pipeline.run(stage, shard_id)
        assert pipeline.state.get_stage(shard_id, "caption").counts["retryable"] == 1
    for name, value in settings_environment(settings).items():
        monkeypatch.setenv(name, value)

    idle = refresh_dag.test()
    assert idle.state == "success" and mapped_shards(idle, "caption") == []

    server.down = set()
    with Pipeline.open(settings) as pipeline:
        time_passes(pipeline, shard_id, timedelta(seconds=PAUSE_S + 60))
    due = refresh_dag.test()
    assert due.state == "success" and mapped_shards(due, "caption") == [shard_id]
    with Pipeline.open(settings) as pipeline:
        caption = pipeline.state.get_stage(shard_id, "caption")
        assert (caption.attempt, caption.counts["asked"], caption.counts["retryable"]) == (2, 1, 0)
        assert [row["fidelity"] for row in captions(pipeline, shard_id)] == ["pass"] * 4


def test_settings_bound_the_budget():
    with pytest.raises(ValueError):
        Settings(caption={"face_max_runs": 0})
    with pytest.raises(ValueError):
        Settings(caption={"face_retry_pause_s": -1})
    # neither changes what a caption is: outputs made under another budget stay current
    assert "face_max_runs" not in CaptionSettings(face_max_runs=9).output_settings()
    assert "face_retry_pause_s" not in CaptionSettings().output_settings()


def test_run_with_fresh_asks_every_face_again_and_force_alone_does_not(shard, server):
    """`facecaption run --force` keeps final faces; `--fresh` (run_shards(fresh=True)) asks
    the LLM for every face again, in the worker processes as in this one."""
    settings, shard_id, _ = shard
    settings = with_budget(settings, server)
    [first] = run_shards(settings, [shard_id], ["caption"])
    assert first.done and first.outcomes[0].counts["asked"] == 4
    requests = server.count
    [forced] = run_shards(settings, [shard_id], ["caption"], force=True)
    assert forced.outcomes[0].counts["asked"] == 0 and server.count == requests
    [fresh] = run_shards(settings, [shard_id], ["caption"], force=True, fresh=True, jobs=2)
    assert fresh.done and fresh.outcomes[0].counts["asked"] == 4
    assert server.count == requests + 4
