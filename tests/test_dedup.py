"""Cross-shard dedup: the owner of an image is its smallest (shard, key) holder whatever order
shards ran in; rows that pointed to an owner that stopped keeping the image are fixed by
re-running the shards that went stale; shards registering the same images at once (real
processes) neither deadlock nor disagree."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support.processes import start_cli
from support.samplesite import Route, SampleSite
from test_concurrency import finish, patient
from test_fetch_web import png, urls_source, wait_for

from facecaption.core.pipeline import Pipeline
from facecaption.core.writers import read_webdataset
from facecaption.release.takedowns import request_takedown


def fetch_rows(pipeline: Pipeline, shard_ids: list[str]) -> dict[str, dict]:
    """Every fetched row of `shard_ids` by its URL's path, with its shard."""
    rows = {}
    for shard_id in shard_ids:
        table = pq.read_table(pipeline.store.shard_path(shard_id, "fetch.parquet"))
        for row in table.to_pylist():
            rows[row["url"].split("/", 3)[3]] = {**row, "shard_id": shard_id}
    return rows


def converge(pipeline: Pipeline) -> list[list[str]]:
    """Re-run stale fetches until none is stale; the shards of each round."""
    rounds = []
    for _ in range(6):
        stale = pipeline.select_work(status="stale", stages=["fetch"]).shard_ids
        if not stale:
            return rounds
        rounds.append(stale)
        for shard_id in stale:
            pipeline.run("fetch", shard_id)
    raise AssertionError(f"fetch never stopped going stale: {rounds}")


def assert_each_image_kept_once_by_its_smallest_holder(
    pipeline: Pipeline, shard_ids: list[str]
) -> None:
    rows = [
        r for r in fetch_rows(pipeline, shard_ids).values() if r["status"] in ("ok", "duplicate")
    ]
    by_sha: dict[str, list[dict]] = {}
    for row in rows:
        by_sha.setdefault(row["sha256"], []).append(row)
    for sha, holders in by_sha.items():
        owner = min(holders, key=lambda r: (r["shard_id"], r["key"]))
        assert owner["status"] == "ok", (sha, owner)
        for row in holders:
            if row is not owner:
                assert row["status"] == "duplicate", row
                assert row["duplicate_of"] == f"{owner['shard_id']}/{owner['key']}", row
    for shard_id in shard_ids:
        with open(pipeline.store.shard_path(shard_id, "fetch.tar"), "rb") as handle:
            kept = set(read_webdataset(handle))
        assert kept == {r["key"] for r in rows if r["shard_id"] == shard_id and r["status"] == "ok"}


def test_the_owner_of_an_image_is_its_smallest_holder_whatever_order_shards_ran(tmp_path, settings):
    same, other = png(50), png(60)
    routes = {
        "a0.png": Route(png(1), "image/png"),
        "same-a.png": Route(same, "image/png"),
        "same-b.png": Route(same, "image/png"),
        "other-a.png": Route(other, "image/png"),
        "other-b.png": Route(other, "image/png"),
        "same-c.png": Route(same, "image/png"),
    }
    with (
        SampleSite(routes) as site,
        Pipeline.open(settings.model_copy(update={"shard_size": 2})) as pipeline,
    ):
        shard_ids = pipeline.select_shards(
            [str(urls_source(tmp_path, [site.url(path) for path in routes]))]
        )
        for shard_id in reversed(shard_ids):  # the last shard first
            pipeline.run("fetch", shard_id)
        # the later shards kept bytes that a smaller holder now owns: they are stale
        assert converge(pipeline) == [shard_ids[1:]]
        assert_each_image_kept_once_by_its_smallest_holder(pipeline, shard_ids)
        rows = fetch_rows(pipeline, shard_ids)
        states = [pipeline.state.get_stage(s, "fetch") for s in shard_ids]
    assert rows["same-a.png"]["status"] == "ok" and rows["other-a.png"]["status"] == "ok"
    # marking again needed no download: the re-runs kept every row
    assert all(site.hits[path] == 1 for path in routes), site.hits
    assert [s.counts["fetched"] for s in states[1:]] == [0, 0]


def test_rows_pointing_to_an_owner_that_stops_keeping_the_image_are_fixed(tmp_path, settings):
    same = png(50)
    routes = {
        "same-a.png": Route(same, "image/png"),
        "x.png": Route(png(1), "image/png"),
        "same-b.png": Route(same, "image/png"),
        "y.png": Route(png(2), "image/png"),
        "same-c.png": Route(same, "image/png"),
        "z.png": Route(png(3), "image/png"),
    }
    with (
        SampleSite(routes) as site,
        Pipeline.open(settings.model_copy(update={"shard_size": 2})) as pipeline,
    ):
        first, second, third = shard_ids = pipeline.select_shards(
            [str(urls_source(tmp_path, [site.url(path) for path in routes]))]
        )
        for shard_id in shard_ids:
            pipeline.run("fetch", shard_id)
        assert fetch_rows(pipeline, shard_ids)["same-b.png"]["duplicate_of"] == f"{first}/000000000"

        # The owner's row fails on a re-fetch (its outputs are gone, its URL answers 404):
        # the others that pointed to it go stale; the next holder fetches its bytes again.
        site.routes["same-a.png"] = Route(b"gone", "text/plain", status=404)
        Path(pipeline.store.shard_path(first, "fetch.tar")).unlink()
        pipeline.run("fetch", first)
        assert converge(pipeline) == [[second, third]]
        assert_each_image_kept_once_by_its_smallest_holder(pipeline, shard_ids)
        rows = fetch_rows(pipeline, shard_ids)
        assert rows["same-a.png"]["status"] == "http_error"
        assert rows["same-b.png"]["status"] == "ok"
        assert rows["same-c.png"]["duplicate_of"] == f"{second}/000000002"
        assert (site.hits["same-b.png"], site.hits["same-c.png"]) == (2, 1)  # only what it must

        # The new owner's URL is taken down: the last holder keeps the image now.
        request_takedown(pipeline, [site.url("same-b.png")], [], reason="test")
        pipeline.run("fetch", second, force=True)
        assert converge(pipeline) == [[third]]
        assert_each_image_kept_once_by_its_smallest_holder(pipeline, shard_ids)
        rows = fetch_rows(pipeline, shard_ids)
    assert rows["same-b.png"]["status"] == "taken_down"
    assert (rows["same-c.png"]["status"], rows["same-c.png"]["duplicate_of"]) == ("ok", None)


@pytest.mark.slow
def test_shards_registering_the_same_images_at_once_neither_deadlock_nor_disagree(
    tmp_path, settings
):
    images = {f"{i}.png": png(i) for i in range(40)}
    gate = threading.Event()  # every shard's last row answers when all four asked for it
    shards = 4
    routes, urls = {}, []
    with SampleSite(routes) as site:
        for shard in range(shards):
            names = list(images)
            random.Random(shard).shuffle(names)  # each shard meets the images in its own order
            for name in names:
                routes[f"{shard}/{name}"] = Route(images[name], "image/png")
                urls.append(site.url(f"{shard}/{name}"))
            routes[f"{shard}/gate.png"] = Route(png(255), "image/png", hold=gate)
            urls.append(site.url(f"{shard}/gate.png"))
        settings = patient(settings, shard_size=len(images) + 1)
        try:
            with Pipeline.open(settings) as pipeline:
                shard_ids = pipeline.select_shards([str(urls_source(tmp_path, urls))])
                run = start_cli(["run", "--stage", "fetch", "--jobs", str(shards)], settings)
                arrived = wait_for(
                    lambda: sum(site.hits.get(f"{s}/gate.png", 0) for s in range(shards)) == shards,
                    180,
                )
                gate.set()  # all four register their holdings at about the same moment
                assert arrived, "the shards never all reached their last row"
                _, err = finish(run)
                assert run.returncode == 0, err
                events = [e for s in shard_ids for e in pipeline.state.events(s, "fetch")]
                assert [e["error"] for e in events if e["event"] == "failed"] == []
                converge(pipeline)
                assert_each_image_kept_once_by_its_smallest_holder(pipeline, shard_ids)
        finally:
            gate.set()
