"""The state DB: migrations, the append-only event log, claims and stage transitions."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from support.processes import sessions_waiting_on
from test_fetch_web import wait_for

from facecaption.core.pipeline import Pipeline
from facecaption.core.store import ArtifactStore
from facecaption.settings import Settings
from facecaption.state import ShardBusyError, ShardState, Source, StateDBError
from facecaption.state.db import (
    Migration,
    create_state_engine,
    current_version,
    load_migrations,
    require_current_schema,
    sqlalchemy_url,
    upgrade,
)
from facecaption.state.shards import AttemptTakenOverError

STAGE = "fetch"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = sa.create_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def empty_engine(empty_db_url: str) -> Iterator[Engine]:
    engine = sa.create_engine(empty_db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def state(engine: Engine) -> ShardState:
    return ShardState(engine)


@pytest.fixture
def other_state(db_url: str) -> Iterator[ShardState]:
    """A second worker: its own engine, so its own connections and sessions."""
    engine = sa.create_engine(db_url)
    yield ShardState(engine)
    engine.dispose()


SOURCE = Source(
    source_id="ab" * 32,
    uri="/data/a.parquet",
    name="a.parquet",
    size_bytes=1234,
    num_rows=80,
    shard_size=10,
    columns={"url": "URL", "caption": "TEXT", "sample_id": None},
)
SHARDS = [
    (f"abababababab_{i * 10:09d}_{i * 10 + 10:09d}", i, i * 10, i * 10 + 10) for i in range(8)
]


@pytest.fixture
def shard_ids(state: ShardState) -> list[str]:
    assert state.register_source(SOURCE, SHARDS) == len(SHARDS)
    return [shard[0] for shard in SHARDS]


def event_names(state: ShardState, shard_id: str, stage: str = STAGE) -> list[tuple[int, str]]:
    return [(e["attempt"], e["event"]) for e in state.events(shard_id, stage)]


LATEST = max(m.version for m in load_migrations())

# -- connection and migrations --------------------------------------------------------------


def test_upgrade_applies_first_migration_on_empty_db(empty_engine: Engine) -> None:
    assert current_version(empty_engine) is None
    applied = upgrade(empty_engine)
    assert [m.version for m in applied] == [m.version for m in load_migrations()]
    assert applied[0].name == "shard_state"
    assert current_version(empty_engine) == LATEST
    with empty_engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT version, name, checksum FROM schema_migrations")).all()
        tables = set(
            conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ).scalars()
        )
    assert [(r.version, r.name, r.checksum) for r in rows] == [
        (m.version, m.name, m.checksum) for m in load_migrations()
    ]
    assert {"sources", "shards", "shard_stages", "stage_events"} <= tables
    require_current_schema(empty_engine)


def test_second_upgrade_applies_nothing(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    assert upgrade(empty_engine) == []
    with empty_engine.connect() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM schema_migrations")).scalar()
    assert count == len(load_migrations())


def test_concurrent_upgrades_apply_each_migration_once(empty_db_url: str) -> None:
    engines = [sa.create_engine(empty_db_url) for _ in range(4)]
    barrier = threading.Barrier(len(engines), timeout=30)

    def run(engine: Engine) -> list[Migration]:
        barrier.wait()
        return upgrade(engine)

    try:
        with ThreadPoolExecutor(len(engines)) as pool:
            results = list(pool.map(run, engines))
        assert sorted(len(applied) for applied in results) == [0, 0, 0, len(load_migrations())]
        assert current_version(engines[0]) == LATEST
    finally:
        for engine in engines:
            engine.dispose()


def test_changed_migration_is_refused(empty_engine: Engine) -> None:
    first = load_migrations()[0]
    upgrade(empty_engine, [first])
    edited = Migration(first.version, first.name, first.sql + "\n-- edited afterwards\n")
    assert edited.checksum != first.checksum
    with pytest.raises(StateDBError, match="0001_shard_state was changed"):
        upgrade(empty_engine, [edited])


def test_new_migration_is_applied_alone(engine: Engine) -> None:
    migrations = [*load_migrations(), Migration(LATEST + 1, "extra", "CREATE TABLE extra (x int);")]
    applied = upgrade(engine, migrations)
    assert [m.version for m in applied] == [LATEST + 1]
    assert current_version(engine) == LATEST + 1
    assert upgrade(engine, migrations) == []


def test_failed_migration_rolls_back_the_whole_upgrade(engine: Engine) -> None:
    migrations = [
        *load_migrations(),
        Migration(LATEST + 1, "good", "CREATE TABLE good_table (x int);"),
        Migration(LATEST + 2, "bad", "CREATE TABLE bad_table (x no_such_type);"),
    ]
    with pytest.raises(sa.exc.ProgrammingError):
        upgrade(engine, migrations)
    assert current_version(engine) == LATEST
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT to_regclass('good_table')")).scalar() is None


def test_require_current_schema_on_empty_db(empty_engine: Engine) -> None:
    with pytest.raises(StateDBError, match="facecaption db upgrade"):
        require_current_schema(empty_engine)


def test_a_migration_missing_below_the_newest_is_named(empty_engine: Engine) -> None:
    """Migrations written on branches land out of order: a DB at the newest version can
    still lack an older one, and must be told to upgrade."""
    upgrade(empty_engine)
    with empty_engine.begin() as conn:  # as if 0002 had not been applied here
        conn.execute(sa.text("DELETE FROM schema_migrations WHERE version = 2"))
    assert current_version(empty_engine) == LATEST
    with pytest.raises(StateDBError, match="lacks migration.*0002"):
        require_current_schema(empty_engine)


def test_open_pipeline_on_unmigrated_db_says_how_to_fix(tmp_path: Path, empty_db_url: str) -> None:
    settings = Settings(home=tmp_path / "home", db_url=empty_db_url)
    with pytest.raises(StateDBError, match="facecaption db upgrade"):
        Pipeline.open(settings)


def test_unreachable_db_is_a_state_db_error(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, db_url="postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(StateDBError, match="cannot reach the state DB"):
        create_state_engine(settings)


def test_sqlalchemy_url_refuses_other_dialects() -> None:
    with pytest.raises(StateDBError, match="must be Postgres"):
        sqlalchemy_url("sqlite:///x")
    with pytest.raises(StateDBError):
        sqlalchemy_url("mysql://u:p@h/d")


def test_sqlalchemy_url_normalises_to_psycopg2() -> None:
    assert sqlalchemy_url("postgresql://u:secret@h:5433/d") == (
        "postgresql+psycopg2://u:secret@h:5433/d"
    )
    assert sqlalchemy_url("postgresql+psycopg2://u@h/d") == "postgresql+psycopg2://u@h/d"


def test_load_migrations_checks_names_and_versions(tmp_path: Path) -> None:
    (tmp_path / "0001_one.sql").write_text("SELECT 1;")
    (tmp_path / "0002_two.sql").write_text("SELECT 2;")
    assert [(m.version, m.name) for m in load_migrations(tmp_path)] == [(1, "one"), (2, "two")]
    (tmp_path / "0002_again.sql").write_text("SELECT 3;")
    with pytest.raises(StateDBError, match="duplicate"):
        load_migrations(tmp_path)
    (tmp_path / "0002_again.sql").unlink()
    (tmp_path / "3_Bad-Name.sql").write_text("SELECT 4;")
    with pytest.raises(StateDBError, match="3_Bad-Name.sql"):
        load_migrations(tmp_path)


# -- sources and shards -----------------------------------------------------------------------


def test_register_source_is_idempotent(state: ShardState, shard_ids: list[str]) -> None:
    assert state.find_source(SOURCE.source_id) == SOURCE
    assert state.register_source(SOURCE, SHARDS) == 0
    moved = Source(**{**SOURCE.__dict__, "uri": "/moved/a.parquet"})
    assert state.register_source(moved, SHARDS[:2]) == 0
    assert state.find_source(SOURCE.source_id).uri == "/moved/a.parquet"
    assert [s.shard_id for s in state.list_shards()] == shard_ids
    assert state.get_shard(shard_ids[3]).source_uri == "/moved/a.parquet"
    assert state.find_source("cd" * 32) is None


# -- the event log ------------------------------------------------------------------------------


def test_stage_events_are_append_only(
    state: ShardState, engine: Engine, shard_ids: list[str]
) -> None:
    shard = shard_ids[0]
    with state.claim(shard, STAGE):
        attempt = state.mark_running(shard, STAGE, "fp", "w1")
        state.mark_done(shard, STAGE, attempt, {"rows": 10}, {}, "fp")
    before = state.events(shard, STAGE)
    assert len(before) == 2
    for statement in (
        "UPDATE stage_events SET event = 'failed'",
        "UPDATE stage_events SET worker = 'someone else' WHERE event = 'started'",
        "DELETE FROM stage_events",
        f"DELETE FROM stage_events WHERE event_id = {before[0]['event_id']}",
    ):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(sa.text(statement))
    assert state.events(shard, STAGE) == before


# -- claims -------------------------------------------------------------------------------------


def test_claim_is_exclusive_across_workers(
    state: ShardState, other_state: ShardState, shard_ids: list[str]
) -> None:
    shard = shard_ids[0]
    with state.claim(shard, STAGE):
        with pytest.raises(ShardBusyError, match=shard), other_state.claim(shard, STAGE):
            pytest.fail("a second worker got a claim that is held")
        # The same worker's own second claim is refused too: it uses another connection.
        with pytest.raises(ShardBusyError), state.claim(shard, STAGE):
            pytest.fail("claimed twice")
        # Other shards and other stages of the same shard are free.
        with other_state.claim(shard_ids[1], STAGE), other_state.claim(shard, "faces"):
            pass
    with other_state.claim(shard, STAGE), pytest.raises(ShardBusyError), state.claim(shard, STAGE):
        pass
    with state.claim(shard, STAGE):
        pass


def test_claim_is_released_when_the_block_raises(
    state: ShardState, other_state: ShardState, shard_ids: list[str]
) -> None:
    with pytest.raises(ZeroDivisionError), state.claim(shard_ids[0], STAGE):
        1 / 0  # noqa: B018
    with other_state.claim(shard_ids[0], STAGE):
        pass


def test_claim_is_released_when_the_worker_dies(
    state: ShardState, other_state: ShardState, engine: Engine, shard_ids: list[str]
) -> None:
    shard = shard_ids[0]
    held = other_state.claim(shard, STAGE)
    conn = held.__enter__()
    pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    other_state.mark_running(shard, STAGE, "fp", "dead-worker")
    with pytest.raises(ShardBusyError), state.claim(shard, STAGE):
        pass
    with engine.connect() as admin:
        assert admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
    with contextlib.suppress(sa.exc.DBAPIError):
        held.__exit__(None, None, None)
    with state.claim(shard, STAGE):
        assert state.mark_running(shard, STAGE, "fp", "w2") == 2
    events = state.events(shard, STAGE)
    assert [(e["attempt"], e["event"], e["worker"]) for e in events] == [
        (1, "started", "dead-worker"),
        (1, "abandoned", "dead-worker"),
        (2, "started", "w2"),
    ]
    assert "died" in events[1]["error"]


# -- stage transitions --------------------------------------------------------------------------


def test_unstarted_stage_is_pending(state: ShardState, shard_ids: list[str]) -> None:
    pending = state.get_stage(shard_ids[0], STAGE)
    assert (pending.status, pending.attempt, pending.counts) == ("pending", 0, {})
    assert state.events(shard_ids[0], STAGE) == []
    assert state.stage_table() == []


def test_running_done_failed_move_status_attempt_and_events(
    state: ShardState, shard_ids: list[str]
) -> None:
    shard = shard_ids[0]
    artifacts = {"fetch.tar": {"uri": "/x/fetch.tar", "sha256": "00" * 32, "bytes": 10}}
    with state.claim(shard, STAGE):
        attempt = state.mark_running(shard, STAGE, "fp1", "w1")
        assert attempt == 1
        running = state.get_stage(shard, STAGE)
        assert (running.status, running.attempt, running.worker) == ("running", 1, "w1")
        assert running.fingerprint is None  # it describes artifacts, and there are none yet
        assert running.started_at is not None and running.finished_at is None
        state.mark_done(shard, STAGE, attempt, {"rows": 10, "ok": 7}, artifacts, "fp1")
    done = state.get_stage(shard, STAGE)
    assert (done.status, done.attempt) == ("done", 1)
    assert done.counts == {"rows": 10, "ok": 7}
    assert done.artifacts == artifacts
    assert done.finished_at >= done.started_at
    assert done.last_error is None

    with state.claim(shard, STAGE):
        attempt = state.mark_running(shard, STAGE, "fp2", "w2")
        assert attempt == 2
        rerun = state.get_stage(shard, STAGE)
        # still the fingerprint of the artifacts attempt 1 left
        assert (rerun.status, rerun.finished_at, rerun.fingerprint) == ("running", None, "fp1")
        state.mark_failed(shard, STAGE, attempt, "ValueError: boom")
    failed = state.get_stage(shard, STAGE)
    assert (failed.status, failed.attempt, failed.worker) == ("failed", 2, "w2")
    assert failed.last_error == "ValueError: boom"
    assert failed.fingerprint == "fp1" and failed.artifacts == artifacts

    events = state.events(shard, STAGE)
    assert [(e["attempt"], e["event"]) for e in events] == [
        (1, "started"),
        (1, "done"),
        (2, "started"),
        (2, "failed"),
    ]
    assert events[1]["counts"] == {"rows": 10, "ok": 7}
    assert events[1]["artifacts"] == artifacts
    assert events[1]["duration_s"] >= 0
    assert [e["fingerprint"] for e in events] == ["fp1", "fp1", "fp2", None]
    assert events[1]["worker"] == "w1"
    assert events[3]["error"] == "ValueError: boom"
    assert events[0]["fingerprint"] == "fp1"
    # Other stages of the shard and other shards are untouched.
    assert state.get_stage(shard, "faces").status == "pending"
    assert [(s.shard_id, s.stage) for s in state.stage_table()] == [(shard, STAGE)]


def test_finishing_a_stale_attempt_is_refused(state: ShardState, shard_ids: list[str]) -> None:
    shard = shard_ids[0]
    with state.claim(shard, STAGE):
        state.mark_running(shard, STAGE, "fp", "w1")
        attempt = state.mark_running(shard, STAGE, "fp", "w1")
        with pytest.raises(RuntimeError, match="attempt 1"):
            state.mark_done(shard, STAGE, 1, {}, {}, "fp")
        state.mark_done(shard, STAGE, attempt, {}, {}, "fp")
    assert state.get_stage(shard, STAGE).status == "done"


def test_left_running_row_is_abandoned_on_next_attempt(
    state: ShardState, shard_ids: list[str]
) -> None:
    shard = shard_ids[0]
    with state.claim(shard, STAGE):
        state.mark_running(shard, STAGE, "fp", "w1")
        # ... and the worker never finishes.
    assert state.get_stage(shard, STAGE).status == "running"
    with state.claim(shard, STAGE):
        attempt = state.mark_running(shard, STAGE, "fp", "w2")
        assert attempt == 2
        state.mark_done(shard, STAGE, attempt, {"rows": 10}, {}, "fp")
    events = state.events(shard, STAGE)
    assert [(e["attempt"], e["event"], e["worker"]) for e in events] == [
        (1, "started", "w1"),
        (1, "abandoned", "w1"),
        (2, "started", "w2"),
        (2, "done", "w2"),
    ]
    final = state.get_stage(shard, STAGE)
    assert (final.status, final.attempt) == ("done", 2)


def test_failed_row_is_not_abandoned(state: ShardState, shard_ids: list[str]) -> None:
    shard = shard_ids[0]
    with state.claim(shard, STAGE):
        state.mark_failed(shard, STAGE, state.mark_running(shard, STAGE, "fp", "w1"), "x")
    with state.claim(shard, STAGE):
        assert state.mark_running(shard, STAGE, "fp", "w1") == 2
    assert event_names(state, shard) == [(1, "started"), (1, "failed"), (2, "started")]


def test_concurrent_workers_on_different_shards(state: ShardState, shard_ids: list[str]) -> None:
    barrier = threading.Barrier(len(shard_ids), timeout=60)

    def work(index: int) -> int:
        shard = shard_ids[index]
        with state.claim(shard, STAGE):
            barrier.wait()  # every claim is held at once
            attempt = state.mark_running(shard, STAGE, f"fp{index}", f"w{index}")
            barrier.wait()  # every shard is running at once
            state.mark_done(shard, STAGE, attempt, {"rows": 10, "index": index}, {}, f"fp{index}")
        return attempt

    with ThreadPoolExecutor(len(shard_ids)) as pool:
        attempts = list(pool.map(work, range(len(shard_ids))))
    assert attempts == [1] * len(shard_ids)
    table = {s.shard_id: s for s in state.stage_table()}
    assert set(table) == set(shard_ids)
    for index, shard in enumerate(shard_ids):
        assert (table[shard].status, table[shard].attempt) == ("done", 1)
        assert table[shard].counts == {"rows": 10, "index": index}
        assert table[shard].worker == f"w{index}"
        assert event_names(state, shard) == [(1, "started"), (1, "done")]


def test_concurrent_workers_each_with_own_engine(db_url: str, shard_ids: list[str]) -> None:
    barrier = threading.Barrier(len(shard_ids), timeout=60)

    def work(index: int) -> str:
        engine = sa.create_engine(db_url, pool_size=2)
        worker = ShardState(engine)
        shard = shard_ids[index]
        try:
            with worker.claim(shard, STAGE):
                barrier.wait()
                attempt = worker.mark_running(shard, STAGE, "fp", f"w{index}")
                barrier.wait()
                worker.mark_done(shard, STAGE, attempt, {"rows": 10}, {}, "fp")
            return worker.get_stage(shard, STAGE).status
        finally:
            engine.dispose()

    with ThreadPoolExecutor(len(shard_ids)) as pool:
        assert list(pool.map(work, range(len(shard_ids)))) == ["done"] * len(shard_ids)


def test_claim_is_released_after_a_failed_statement_on_its_connection(
    state: ShardState, other_state: ShardState, shard_ids: list[str]
) -> None:
    with (
        pytest.raises(sa.exc.DataError, match="division by zero"),
        state.claim(shard_ids[0], STAGE) as conn,
    ):
        conn.execute(sa.text("SELECT 1/0"))
    with other_state.claim(shard_ids[0], STAGE):
        pass


# -- lock keys and fencing ----------------------------------------------------------------------


def test_claims_of_shards_whose_32_bit_hashes_collide_are_independent(
    state: ShardState, other_state: ShardState
) -> None:
    # Shard ids that Postgres' 32-bit hashtext maps to the same number (about ten such pairs
    # among 300,000 ids): keyed by it, a claim on one would have made the other busy.
    with state.engine.connect() as conn:
        first, second = conn.execute(
            sa.text(
                "SELECT ids[1], ids[2] FROM (SELECT array_agg(id) AS ids FROM"
                " (SELECT 'abababababab_' || lpad(g::text, 9, '0') || '_000000010' AS id"
                " FROM generate_series(1, 300000) g) candidates"
                " GROUP BY hashtext(id) HAVING count(*) > 1 LIMIT 1) pairs"
            )
        ).one()
    with state.claim(first, STAGE), other_state.claim(second, STAGE):
        pass  # both held at once
    with state.claim(first, STAGE), pytest.raises(ShardBusyError), other_state.claim(first, STAGE):
        pass


def test_a_worker_whose_lock_was_lost_publishes_nothing_after_a_takeover(
    state: ShardState,
    other_state: ShardState,
    engine: Engine,
    shard_ids: list[str],
    tmp_path: Path,
) -> None:
    shard = shard_ids[0]
    held = state.claim(shard, STAGE)
    conn = held.__enter__()
    first = state.mark_running(shard, STAGE, "fp", "w1")
    store = ArtifactStore(str(tmp_path)).owned_by(
        STAGE, first, partial(state.hold_attempt, shard, STAGE, first)
    )
    path = store.shard_path(shard, "fetch.parquet")
    # The worker's session ends while it works (idle timeout, pg_terminate_backend, restart):
    # its lock goes with it, and another worker takes the stage over.
    pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    with engine.connect() as admin:
        assert admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
    with contextlib.suppress(sa.exc.DBAPIError):
        held.__exit__(None, None, None)
    with other_state.claim(shard, STAGE):
        second = other_state.mark_running(shard, STAGE, "fp", "w2")
        with (
            pytest.raises(AttemptTakenOverError, match="taken over by attempt 2") as refused,
            store.publish(path) as tmp,
        ):
            tmp.write_bytes(b"the first worker's late output")
        assert not Path(path).exists()
        assert list(Path(path).parent.iterdir()) == []  # its temporary file is gone too
        # its own error goes into the history; the row stays the new attempt's
        state.mark_failed(shard, STAGE, first, f"AttemptTakenOverError: {refused.value}")
        with pytest.raises(AttemptTakenOverError, match="attempt 1"):
            state.mark_done(shard, STAGE, first, {}, {}, "fp")
        running = other_state.get_stage(shard, STAGE)
        assert (running.status, running.attempt, running.worker) == ("running", 2, "w2")
        other_state.mark_done(shard, STAGE, second, {"rows": 1}, {}, "fp")
    events = state.events(shard, STAGE)
    assert [(e["attempt"], e["event"]) for e in events] == [
        (1, "started"),
        (1, "abandoned"),
        (2, "started"),
        (1, "failed"),
        (2, "done"),
    ]
    assert "taken over by attempt 2 (w2, running)" in events[3]["error"]
    assert not any("not current" in (e["error"] or "") for e in events)


def test_a_new_attempt_waits_for_a_publication_in_progress(
    state: ShardState, other_state: ShardState, engine: Engine, shard_ids: list[str]
) -> None:
    """The check and the rename are one step for the others: a takeover that comes while the
    old attempt is inside its fence starts only after the rename."""
    shard = shard_ids[0]
    with state.claim(shard, STAGE):
        first = state.mark_running(shard, STAGE, "fp", "w1")
    renaming = threading.Event()
    renamed = threading.Event()

    def publish() -> None:
        with state.hold_attempt(shard, STAGE, first):
            renaming.set()
            renamed.wait(30)

    with ThreadPoolExecutor(2) as pool:
        publisher = pool.submit(publish)
        assert renaming.wait(30)
        with other_state.claim(shard, STAGE):
            takeover = pool.submit(other_state.mark_running, shard, STAGE, "fp", "w2")
            assert wait_for(lambda: sessions_waiting_on(engine, "shard_stages") == 1, 30)
            assert not takeover.done()
            renamed.set()
            publisher.result(30)
            assert takeover.result(30) == 2
    with pytest.raises(AttemptTakenOverError), state.hold_attempt(shard, STAGE, first):
        pass
