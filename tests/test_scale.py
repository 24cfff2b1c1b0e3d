"""At LAION-Face scale (5,000 shards, 25,000 stage rows) a request must not cost a query per
shard: selection, status (CLI and the shard view's data and stale markers), the report's
collection and takedown matching issue the same number of queries over 20 shards as over 2.
The state is synthetic (tests/support/scale.py), written straight into the test's database."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from support.scale import count_queries, image_sha256, image_url, populate

from facecaption.cli import main
from facecaption.core.bulk import collector_paused
from facecaption.core.fingerprints import Fingerprints, LiveStageInputs, current_fingerprint
from facecaption.core.pipeline import Pipeline, chunked, status_totals
from facecaption.core.stage import StageInputError, stage_registry
from facecaption.core.status import stale_stages
from facecaption.release.export import UPSTREAM
from facecaption.release.publish import export_shards
from facecaption.release.report import collect
from facecaption.release.takedowns import match_pending_takedowns, request_takedown


def requests(pipeline: Pipeline, ids: list[str]) -> dict[str, Callable[[], Any]]:
    return {
        "select all": lambda: pipeline.select_work().shard_ids,
        "select pending": lambda: pipeline.select_work(status="pending").shard_ids,
        "select failed": lambda: pipeline.select_work(status="failed").shard_ids,
        "select stale": lambda: pipeline.select_work(status="stale").shard_ids,
        "select work": lambda: pipeline.select_work(status="work").shard_ids,
        "select stale by shard ids": lambda: (
            pipeline.select_work(shard_ids=ids, status="stale").shard_ids
        ),
        "select after a cursor": lambda: (
            pipeline.select_work(status="work", after=ids[0]).shard_ids
        ),
        "status": lambda: pipeline.status(),
        "status of shard ids": lambda: pipeline.status(ids),
        "status page": lambda: pipeline.status_page(status="done", stage="caption", limit=10),
        "shard view page": lambda: stale_stages(
            pipeline, [row.shard_id for row in pipeline.status_page(limit=100).rows]
        ),
        "report collection": lambda: collect(pipeline),
        "takedown matching": lambda: match_pending_takedowns(pipeline),
    }


def query_counts(settings, ids: list[str]) -> dict[str, int]:
    counts = {}
    with Pipeline.open(settings) as pipeline:
        for name, request in requests(pipeline, ids).items():
            with count_queries() as statements:
                request()
            counts[name] = len(statements)
    with count_queries() as statements:
        assert main(["status", "--json"]) == 0
    counts["facecaption status"] = len(statements)
    return counts


@pytest.fixture
def cli_settings(settings, settings_env, monkeypatch):
    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)
    return settings


def test_requests_cost_the_same_queries_at_2_and_at_20_shards(cli_settings, capsys):
    settings = cli_settings
    with Pipeline.open(settings) as pipeline:
        few = populate(pipeline.state.engine, settings, 2)
    at_two = query_counts(settings, few)
    with Pipeline.open(settings) as pipeline:
        more = populate(pipeline.state.engine, settings, 18, first=2, takedown_requests=0)
    at_twenty = query_counts(settings, few + more)
    capsys.readouterr()
    assert at_twenty == at_two
    assert max(at_two.values()) <= 12, at_two


def test_synthetic_state_is_current_so_selection_checks_every_fingerprint(cli_settings):
    """The state the counts are taken on is what a finished build leaves: nothing pending or
    stale; and one changed setting makes every shard stale again."""
    settings = cli_settings
    with Pipeline.open(settings) as pipeline:
        ids = populate(pipeline.state.engine, settings, 20)
        assert pipeline.select_work(status="work").shard_ids == []
        assert pipeline.select_work(status="all").shard_ids == sorted(ids, key=ids.index)
        page = pipeline.status_page(limit=5, offset=5)
        assert [row.shard_id for row in page.rows] == pipeline.select_work().shard_ids[5:10]
        assert (page.matched, page.registered) == (20, 20)
        assert page.totals == status_totals(pipeline.status())
        assert stale_stages(pipeline, ids) == {}  # the shard view marks nothing stale
    stricter = settings.model_copy(
        update={"caption": settings.caption.model_copy(update={"seed": 1})}
    )
    with Pipeline.open(stricter) as pipeline:
        stale = pipeline.select_work(status="stale", stages=["caption"]).shard_ids
        assert len(stale) == 20
        assert stale_stages(pipeline, ids) == {(shard_id, "caption"): "stale" for shard_id in ids}
        # a run too large for one Airflow mapping goes chunk by chunk, each after the last
        first = pipeline.select_work(status="stale", max_shards=8).shard_ids
        second = pipeline.select_work(status="stale", max_shards=8, after=first[-1]).shard_ids
        third = pipeline.select_work(status="stale", max_shards=8, after=second[-1]).shard_ids
        assert first + second + third == stale
        assert [len(chunk) for chunk in chunked(stale, 8)] == [8, 8, 4]


def test_a_publish_over_unchanged_shards_runs_no_export_and_costs_the_same_queries(
    cli_settings,
):
    """The release step after every run checks every shard's export; over shards whose
    exports are up to date (and their files there) that check is a few queries in all, not
    the stage's lock and queries per shard. A shard whose file went missing is exported again
    (and, its caption output being synthetic, left out with the reason)."""
    settings = cli_settings

    def exports(ids: list[str]) -> tuple[dict, dict, int]:
        with Pipeline.open(settings) as pipeline:
            for shard_id in ids:  # the files the synthetic exports record, at their sizes
                with pipeline.store.publish(
                    pipeline.store.shard_path(shard_id, "release.parquet")
                ) as tmp:
                    tmp.write_bytes(b"x" * 1000)
            with count_queries() as statements:
                exported, excluded = export_shards(pipeline)
        return exported, excluded, len(statements)

    with Pipeline.open(settings) as pipeline:
        few = populate(pipeline.state.engine, settings, 2, takedown_requests=0)
    exported, excluded, at_two = exports(few)
    assert (list(exported), excluded) == (few, {})
    with Pipeline.open(settings) as pipeline:
        more = populate(pipeline.state.engine, settings, 18, first=2, takedown_requests=0)
    exported, excluded, at_twenty = exports(few + more)
    assert (list(exported), excluded) == (few + more, {})
    assert at_twenty == at_two <= 6
    assert exported[more[0]]["rows"] > 0  # the entry is the export's, counts included

    with Pipeline.open(settings) as pipeline:
        pipeline.store.remove(pipeline.store.shard_path(more[0], "release.parquet"))
        with count_queries() as statements:
            exported, excluded = export_shards(pipeline)
    assert list(excluded) == [more[0]] and more[0] not in exported
    assert len(exported) == 19 and len(statements) > at_twenty  # that one shard ran


def test_takedowns_match_by_index_with_urls_normalised(cli_settings):
    settings = cli_settings
    with Pipeline.open(settings) as pipeline:
        ids = populate(pipeline.state.engine, settings, 3, takedown_requests=0)
        url = image_url(ids[1], 7)
        spelled = url.replace("https://images.example.org/", "HTTPS://Images.Example.ORG:443/")
        by_url = request_takedown(pipeline, [spelled], [])
        by_sha = request_takedown(pipeline, [], [image_sha256(ids[2], 3)])
        nothing = request_takedown(pipeline, ["https://elsewhere.example/x.jpg"], [])
        with count_queries() as statements:
            matched = match_pending_takedowns(pipeline)
        assert len(statements) <= 3
    assert matched[by_url] == {
        "rows": 1, "shards": [ids[1]], "sha256s": [image_sha256(ids[1], 7)]
    }  # fmt: skip
    assert matched[by_sha] == {"rows": 1, "shards": [ids[2]], "sha256s": [image_sha256(ids[2], 3)]}
    assert matched[nothing] == {"rows": 0, "shards": [], "sha256s": []}


def test_bulk_fingerprints_are_the_runners_fingerprints(cli_settings):
    """Selection's prefetched, once-per-stage fingerprints hash the same bytes as the runner's
    (takedown matches included)."""
    settings = cli_settings
    with Pipeline.open(settings) as pipeline:
        ids = populate(pipeline.state.engine, settings, 3)
        match_pending_takedowns(pipeline)  # export fingerprints now cover matches
        registry = stage_registry()
        bulk = Fingerprints.prefetch(settings, pipeline.state, registry, None)
        live = LiveStageInputs(pipeline.state)
        matched = 0
        for shard in pipeline.state.list_shards():
            matched += bool(live.takedown_matches(shard.shard_id))
            for name, stage in registry.items():
                assert bulk.current(name, shard) == current_fingerprint(
                    stage, shard, settings, live
                ), (shard.shard_id, name)
        assert matched
        # the matched shards' exports are stale now, and only those
        stale = pipeline.select_work(status="stale", stages=["export"]).shard_ids
        assert stale and set(stale) <= set(ids)
        assert set(stale) == {s for s in ids if live.takedown_matches(s)}


def test_bulk_fingerprints_cover_dedup_epochs_and_what_each_stage_ran_on(cli_settings):
    """A shard whose dedup epoch was raised has a stale fetch, and an export whose input
    stages did not run on each other's current outputs cannot be worked out (StageInputError):
    selection reads epochs and recorded inputs in bulk and decides as the runner does."""
    settings = cli_settings
    with Pipeline.open(settings) as pipeline:
        ids = populate(pipeline.state.engine, settings, 4, takedown_requests=0)
        with pipeline.state.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE shards SET dedup_epoch = 3 WHERE shard_id = :s"), {"s": ids[1]}
            )
            # the attribute stage of ids[2] ran on other detect outputs than there are now
            conn.execute(
                sa.text(
                    "UPDATE shard_stages SET inputs = jsonb_set(inputs,"
                    " '{detect,faces.parquet}', to_jsonb(CAST(:sha AS text)))"
                    " WHERE shard_id = :s AND stage = 'attribute'"
                ),
                {"sha": "0" * 64, "s": ids[2]},
            )
        registry = stage_registry()
        live = LiveStageInputs(pipeline.state)
        with count_queries() as statements:
            bulk = Fingerprints.prefetch(settings, pipeline.state, registry, None)
        assert len(statements) == 3  # stages, takedown matches, dedup epochs

        def outcome(work: Callable[..., str], *args: Any) -> str:
            try:
                return work(*args)
            except StageInputError as error:
                return str(error)

        for shard in pipeline.state.list_shards():
            for name, stage in registry.items():
                assert outcome(bulk.current, name, shard) == outcome(
                    current_fingerprint, stage, shard, settings, live
                ), (shard.shard_id, name)
        # prefetch reads of a stage's recorded inputs only the stage before it in pipeline
        # order, which is the order of export's chain
        assert list(UPSTREAM) == list(registry)[: len(UPSTREAM)]
        [chained] = pipeline.state.list_shards(shard_ids=[ids[2]])
        assert "attribute of shard" in outcome(bulk.current, "export", chained)
        assert pipeline.select_work(status="stale", stages=["fetch"]).shard_ids == [ids[1]]
        # the export of ids[2] is not stale: the attribute stage before it is the one to redo
        assert pipeline.select_work(status="stale").shard_ids == [ids[1]]


def test_status_filters_and_pages_in_sql(cli_settings):
    settings = cli_settings
    with Pipeline.open(settings) as pipeline:
        ids = populate(pipeline.state.engine, settings, 12, takedown_requests=0)
        state = pipeline.state
        with state.claim(ids[3], "detect"):
            attempt = state.mark_running(ids[3], "detect", "fp", "w")
            state.mark_failed(ids[3], "detect", attempt, "RuntimeError: boom")
        with pipeline.state.engine.begin() as conn:  # a stage never run: pending
            conn.execute(
                sa.text("DELETE FROM shard_stages WHERE shard_id = :s AND stage = 'caption'"),
                {"s": ids[5]},
            )
        ordered = pipeline.select_work().shard_ids

        def shown(**filters) -> list[str]:
            return [row.shard_id for row in pipeline.status(**filters)]

        assert shown(status="failed") == [ids[3]]
        assert shown(status="failed", stage="detect") == [ids[3]]
        assert shown(status="failed", stage="fetch") == []
        assert shown(status="pending") == [ids[5]]
        assert shown(status="pending", stage="caption") == [ids[5]]
        assert shown(status="pending", stage="detect") == []
        assert shown(contains=ids[7][-12:]) == [ids[7]]
        assert shown(status="done", stage="detect") == [s for s in ordered if s != ids[3]]
        assert shown(limit=4, offset=8) == ordered[8:12]
        page = pipeline.status_page(status="done", stage="detect", limit=3)
        assert (len(page.rows), page.matched, page.registered) == (3, 11, 12)
        assert page.totals["detect"]["shards"] == {"done": 11, "failed": 1}
        assert page.totals["caption"]["shards"] == {"done": 11, "pending": 1}
        assert page.totals == status_totals(pipeline.status())
        [row] = pipeline.status([ids[5]])
        assert row.stages["caption"].status == "pending"
        with pytest.raises(ValueError, match="status must be"):
            pipeline.status(status="stale")


def test_the_collector_pause_leaves_the_collector_as_it_found_it():
    """Selection, status and the report hold the cyclic collector off while they build
    their objects: an inner block does not turn it back on early, a block that found it off
    leaves it off, and an error in the block still turns it back on."""
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
