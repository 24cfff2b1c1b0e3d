"""The release: FaceCaption-compatible parquet, manifest, training shards, incremental
re-export and takedowns, over a real pipeline run on the loopback sample site."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from PIL import Image
from support.processes import sessions_waiting_on, start_cli
from support.sampledata import write_source
from test_fetch_web import wait_for

from facecaption.core.pipeline import Pipeline
from facecaption.core.store import PARTIAL_MARKER, sha256_file
from facecaption.release.publish import publish_release
from facecaption.release.takedowns import request_takedown
from facecaption.state.takedowns import TakedownIndex, TakedownRequestError
from tests.test_select import build_all


def release_settings(settings, **export):
    """Small faces and every attributed face kept (more rows to work with), and the given
    export settings."""
    return settings.model_copy(
        update={
            "detect": settings.detect.model_copy(update={"min_face_px": 40}),
            "attribute": settings.attribute.model_copy(update={"min_labels": 0}),
            "export": settings.export.model_copy(update=export),
        }
    )


@pytest.fixture
def released(tmp_path, settings, sample, sample_site):
    settings = release_settings(settings, rows_per_file=6, row_group_size=4, training_shards=True)
    settings, shard_ids, source = build_all(tmp_path, settings, sample, sample_site)
    with Pipeline.open(settings) as pipeline:
        report = publish_release(pipeline)
    return settings, shard_ids, report


def release_table(report) -> pa.Table:
    return pa.concat_tables(
        pq.read_table(f"{report.release_uri}/{entry['path']}") for entry in report.manifest["files"]
    )


def captioned_faces(settings, shard_ids) -> list[str]:
    with Pipeline.open(settings) as pipeline:
        return [
            face_id
            for shard_id in shard_ids
            for face_id in pq.read_table(
                pipeline.store.shard_path(shard_id, "captions.parquet"), columns=["face_id"]
            )
            .column("face_id")
            .to_pylist()
        ]


def test_release_has_facecaption_columns_one_face_per_row(released):
    settings, shard_ids, report = released
    table = release_table(report)
    schema = table.schema
    assert schema.names[:4] == ["url", "box", "laion_caption", "caption"]
    assert schema.field("url").type == pa.string()
    assert schema.field("box").type == pa.list_(pa.int32())
    assert schema.field("laion_caption").type == pa.list_(pa.string())
    assert schema.field("caption").type == pa.list_(pa.string())
    rows = table.to_pylist()
    # one row per captioned face, each face once
    assert sorted(row["face_id"] for row in rows) == sorted(captioned_faces(settings, shard_ids))
    assert len(rows) == report.rows > 4
    for row in rows:
        x1, y1, x2, y2 = row["box"]
        assert 0 <= x1 < x2 <= row["image_width"] and 0 <= y1 < y2 <= row["image_height"]
        assert len(row["caption"]) == 1 and row["caption"][0]
        assert row["url"].startswith("http://127.0.0.1")
        assert row["fingerprint"] and row["license"].startswith("Captions: CC-BY-4.0")
        assert row["detector_id"] and row["attribute_model_id"] and row["caption_model_id"]


def test_files_are_split_with_row_groups_and_checksummed_in_the_manifest(released):
    _, _, report = released
    files = report.manifest["files"]
    assert len(files) >= 2  # rows_per_file=6 over three shards
    assert sum(entry["rows"] for entry in files) == report.rows
    for entry in files:
        path = f"{report.release_uri}/{entry['path']}"
        with open(path, "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == entry["sha256"]
        metadata = pq.ParquetFile(path).metadata
        assert metadata.num_rows == entry["rows"]
        assert all(metadata.row_group(i).num_rows <= 4 for i in range(metadata.num_row_groups))
    with open(f"{report.release_uri}/manifest.json") as handle:
        assert json.load(handle)["rows"] == report.rows


def test_release_loads_with_pandas_and_datasets(released, tmp_path, monkeypatch):
    _, _, report = released
    paths = [f"{report.release_uri}/{entry['path']}" for entry in report.manifest["files"]]
    frame = pd.concat(pd.read_parquet(path) for path in paths)
    assert len(frame) == report.rows
    assert list(frame["box"].iloc[0]) == release_table(report).column("box")[0].as_py()

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    loaded = datasets.load_dataset(
        "parquet", data_files=paths, split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert loaded.num_rows == report.rows
    assert loaded.features["box"].feature.dtype == "int32"
    assert sorted(loaded["face_id"]) == sorted(frame["face_id"])


def test_training_shards_read_back_with_webdataset(released):
    import webdataset as wds

    _, _, report = released
    triples = []
    for entry in report.manifest["training_shards"]:
        dataset = wds.WebDataset(
            f"{report.release_uri}/{entry['path']}", shardshuffle=False, empty_check=False
        ).to_tuple("jpg", "txt", "json")
        triples += list(dataset)
        assert entry["samples"] == sum(1 for _ in wds.WebDataset(
            f"{report.release_uri}/{entry['path']}", shardshuffle=False, empty_check=False
        ))  # fmt: skip
    assert len(triples) == report.rows
    captions = {row["face_id"]: row["caption"][0] for row in release_table(report).to_pylist()}
    for jpg, txt, meta in triples:
        meta = json.loads(meta)
        image = Image.open(io.BytesIO(jpg))
        assert image.format == "JPEG"
        assert image.size == (meta["crop_width"], meta["crop_height"])
        assert txt.decode() == captions[meta["face_id"]]


def test_re_export_is_incremental(released, tmp_path, sample, sample_site):
    settings, shard_ids, first = released
    with Pipeline.open(settings) as pipeline:
        again = publish_release(pipeline)
        assert again.files_written == [] and again.files_removed == []
        assert again.manifest["files"] == first.manifest["files"]
        # A new source file: its shards join the last file or new ones; the others stay.
        source = write_source(
            sample[:8], sample_site.url("").rstrip("/") + "/again", tmp_path / "more.parquet"
        )
        for shard_id in pipeline.select_shards([str(source)]):
            for stage in pipeline.stage_names:
                pipeline.run(stage, shard_id)
        grown = publish_release(pipeline)
    before = {entry["path"] for entry in first.manifest["files"][:-1]}
    assert before <= set(grown.files_kept)
    assert all(
        name.startswith("data/part-") or name.startswith("train/") for name in grown.files_written
    )
    assert not before & set(grown.files_written)


def test_takedown_removes_exactly_its_rows_and_crops_and_fetch_skips_them(released, sample_site):
    settings, shard_ids, report = released
    rows = release_table(report).to_pylist()
    by_url: dict[str, list[dict]] = {}
    for row in rows:
        by_url.setdefault(row["url"], []).append(row)
    urls = sorted(by_url)
    assert len(urls) >= 3
    url_target, sha_target = urls[0], by_url[urls[1]][0]["image_sha256"]
    doomed = {r["face_id"] for r in by_url[urls[0]] + by_url[urls[1]]}
    doomed_shards = {r["shard_id"] for r in by_url[urls[0]] + by_url[urls[1]]}
    with Pipeline.open(settings) as pipeline:
        request_id = request_takedown(
            pipeline, [url_target], [sha_target], reason="subject's request", requested_by="t"
        )
        after = publish_release(pipeline)
        kept = {row["face_id"] for row in release_table(after).to_pylist()}
        assert kept == {row["face_id"] for row in rows} - doomed
        # training shards lost the same faces, and only those
        import webdataset as wds

        samples = {
            json.loads(meta)["face_id"]
            for entry in after.manifest["training_shards"]
            for (meta,) in wds.WebDataset(
                f"{after.release_uri}/{entry['path']}", shardshuffle=False, empty_check=False
            ).to_tuple("json")
        }
        assert samples == kept
        # only the files holding affected shards were rewritten
        touched = {
            entry["path"] for entry in report.manifest["files"]
            if doomed_shards & set(entry["shards"])
        }  # fmt: skip
        assert set(after.files_removed) == touched
        assert {n for n in after.files_written if n.startswith("train/")} == {
            f"train/{shard}.tar" for shard in doomed_shards
        }
        assert len([n for n in after.files_written if n.startswith("data/")]) == len(touched)
        assert after.takedowns_applied == [request_id]
        audit = TakedownIndex(pipeline.state.engine).get(request_id)
        assert audit.applied_at is not None and audit.applied_at >= audit.requested_at
        assert audit.outputs["export_id"] == after.export_id
        assert set(audit.outputs["removed"]) == set(after.files_removed)
        assert audit.matched["rows"] >= 2 and set(audit.matched["shards"]) == doomed_shards
        # the next fetch skips both: the URL without a request, the bytes after download
        hits_before = dict(sample_site.hits)
        for shard_id in doomed_shards:
            pipeline.run("fetch", shard_id, force=True)
        fetched = pd.concat(
            pd.read_parquet(pipeline.store.shard_path(shard_id, "fetch.parquet"))
            for shard_id in shard_ids
        )
    taken = fetched[fetched["status"] == "taken_down"]
    assert url_target in set(taken["url"])
    assert set(fetched[fetched["sha256"] == sha_target]["status"]) <= {"taken_down"}
    path = urlsplit(url_target).path
    target_hits = {k: n for k, n in sample_site.hits.items() if k.endswith(path.lstrip("/"))}
    assert target_hits and target_hits == {k: hits_before[k] for k in target_hits}


def test_takedown_requests_are_validated(settings):
    with Pipeline.open(settings) as pipeline:
        with pytest.raises(TakedownRequestError, match="at least one"):
            request_takedown(pipeline, [" "], [])
        with pytest.raises(TakedownRequestError, match="not a sha256"):
            request_takedown(pipeline, [], ["abc"])
        with pipeline.state.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM takedown_requests")).scalar() == 0


def test_a_shard_being_exported_elsewhere_keeps_its_last_export(released):
    settings, _, first = released
    busy = release_table(first).column("shard_id")[0].as_py()
    with Pipeline.open(settings) as pipeline, pipeline.state.claim(busy, "export"):
        # another worker's export attempt runs: the row says `running` until it finishes
        pipeline.state.mark_running(busy, "export", "its fingerprint", "elsewhere:1")
        again = publish_release(pipeline)
    assert again.rows == first.rows and again.excluded == {}
    assert again.files_written == []
    assert again.manifest["built_from"] == first.manifest["built_from"]


def test_shards_fetched_before_the_takedown_index_are_indexed_once(released):
    """The takedown index is what matching reads; a shard fetched before it existed is indexed
    from its fetch.parquet the first time a takedown is matched, and then never read again."""
    settings, shard_ids, report = released
    rows = release_table(report).to_pylist()
    target = rows[0]
    with Pipeline.open(settings) as pipeline:
        index = TakedownIndex(pipeline.state.engine)
        assert index.unindexed_fetches("fetch.parquet") == {}  # fetch indexed as it published
        with pipeline.state.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM fetched_images"))
            conn.execute(sa.text("DELETE FROM fetched_images_indexed"))
        assert set(index.unindexed_fetches("fetch.parquet")) == set(shard_ids)
        # the URL as a person would paste it: scheme and host in capitals
        parts = urlsplit(target["url"])
        origin = f"{parts.scheme}://{parts.netloc}"
        shouted = target["url"].replace(origin, origin.upper())
        request_id = request_takedown(pipeline, [shouted], [])
        after = publish_release(pipeline)
        assert index.unindexed_fetches("fetch.parquet") == {}
        audit = index.get(request_id)
    kept = {row["face_id"] for row in release_table(after).to_pylist()}
    gone = {row["face_id"] for row in rows if row["image_sha256"] == target["image_sha256"]}
    assert gone and not gone & kept
    assert kept == {row["face_id"] for row in rows} - gone
    assert audit.urls == [shouted] and audit.matched["sha256s"] == [target["image_sha256"]]


def test_an_unindexed_shard_that_cannot_be_read_holds_back_pending_takedowns(released):
    """A shard fetched before the takedown index existed whose fetch.parquet cannot be read
    to index it may hold rows under a pending request: while one is pending the shard is left
    out and the requests stay pending; once it can be read, the next publish applies them."""
    settings, _, first = released
    rows = release_table(first).to_pylist()
    shards = list(dict.fromkeys(row["shard_id"] for row in rows))
    broken, target = shards[0], next(row for row in rows if row["shard_id"] == shards[1])
    with Pipeline.open(settings) as pipeline:
        with pipeline.state.engine.begin() as conn:
            for table in ("fetched_images", "fetched_images_indexed"):
                conn.execute(sa.text(f"DELETE FROM {table} WHERE shard_id = :s"), {"s": broken})
        path = Path(pipeline.store.shard_path(broken, "fetch.parquet"))
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        nothing_pending = publish_release(pipeline)  # its export is up to date: released
        assert nothing_pending.excluded == {} and nothing_pending.rows == first.rows
        request_id = request_takedown(pipeline, [target["url"]], [], reason="r")
        held = publish_release(pipeline)
        assert "cannot be read to match takedown requests" in held.excluded[broken]
        assert held.takedowns_applied == []
        assert TakedownIndex(pipeline.state.engine).get(request_id).applied_at is None
        path.write_bytes(whole)
        applied = publish_release(pipeline)
        assert TakedownIndex(pipeline.state.engine).get(request_id).applied_at is not None
    assert {r["shard_id"] for r in release_table(held).to_pylist()} == set(shards) - {broken}
    assert target["image_sha256"] not in {
        r["image_sha256"] for r in release_table(held).to_pylist()
    }
    assert applied.excluded == {} and applied.takedowns_applied == [request_id]
    assert {r["face_id"] for r in release_table(applied).to_pylist()} == {
        r["face_id"] for r in rows if r["image_sha256"] != target["image_sha256"]
    }


def test_a_busy_shard_whose_rows_were_taken_down_since_is_left_out(released):
    settings, _, first = released
    rows = release_table(first).to_pylist()
    busy, target = rows[0]["shard_id"], rows[0]
    with Pipeline.open(settings) as pipeline, pipeline.state.claim(busy, "export"):
        pipeline.state.mark_running(busy, "export", "its fingerprint", "elsewhere:1")
        request_id = request_takedown(pipeline, [target["url"]], [], reason="r")
        again = publish_release(pipeline)
    assert "predates takedown matches" in again.excluded[busy]
    assert again.takedowns_applied == [request_id]
    expected = {
        r["face_id"] for r in rows
        if r["shard_id"] != busy and r["image_sha256"] != target["image_sha256"]
    }  # fmt: skip
    assert {r["face_id"] for r in release_table(again).to_pylist()} == expected


# -- a shard whose outputs do not fit together never stops a publish ---------------------------


def record_as_written(pipeline, shard_id: str, stage: str, name: str, read_by: str | None) -> None:
    """Make the state DB agree with an artifact changed by hand, as if `stage` had written it
    and `read_by` had run on it: the records fit together, the files do not."""
    path = Path(pipeline.store.shard_path(shard_id, name))
    ref = {"uri": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
    with pipeline.state.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE shard_stages SET artifacts = jsonb_set(artifacts, ARRAY[:name],"
                " CAST(:ref AS jsonb)) WHERE shard_id = :s AND stage = :t"
            ),
            {"name": name, "ref": json.dumps(ref), "s": shard_id, "t": stage},
        )
        if read_by:
            conn.execute(
                sa.text(
                    "UPDATE shard_stages SET inputs = jsonb_set(inputs, ARRAY[:t, :name],"
                    " to_jsonb(CAST(:sha AS text))) WHERE shard_id = :s AND stage = :next"
                ),
                {"t": stage, "name": name, "sha": ref["sha256"], "s": shard_id, "next": read_by},
            )


def _rewrite(pipeline, shard_id: str, name: str, change) -> Path:
    path = Path(pipeline.store.shard_path(shard_id, name))
    pq.write_table(change(pq.read_table(path)), path)
    return path


def drop_a_faces_fetch_row(pipeline, shard_id):
    key = pq.read_table(pipeline.store.shard_path(shard_id, "faces.parquet"))["key"][0].as_py()
    _rewrite(pipeline, shard_id, "fetch.parquet", lambda t: t.filter(pc.field("key") != key))
    record_as_written(pipeline, shard_id, "fetch", "fetch.parquet", "detect")


def caption_an_unknown_face(pipeline, shard_id):
    def add(table):
        ghost = table.slice(0, 1).to_pylist()[0] | {"face_id": f"{shard_id}/999999999_0"}
        return pa.concat_tables([table, pa.Table.from_pylist([ghost], schema=table.schema)])

    _rewrite(pipeline, shard_id, "captions.parquet", add)
    record_as_written(pipeline, shard_id, "caption", "captions.parquet", "export")


def delete_faces(pipeline, shard_id):
    Path(pipeline.store.shard_path(shard_id, "faces.parquet")).unlink()


def truncate_attributes(pipeline, shard_id):
    path = Path(pipeline.store.shard_path(shard_id, "attributes.parquet"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def release_file_with_other_columns(pipeline, shard_id):
    _rewrite(pipeline, shard_id, "release.parquet", lambda t: t.drop_columns(["license"]))
    record_as_written(pipeline, shard_id, "export", "release.parquet", None)


@pytest.mark.parametrize(
    ("damage", "exports_stale", "reason"),
    [
        (drop_a_faces_fetch_row, False, "which is not an ok image in fetch.parquet"),
        (caption_an_unknown_face, False, "has a caption but no row in faces.parquet"),
        (delete_faces, True, "faces.parquet of shard"),
        (truncate_attributes, True, "attributes.parquet of shard"),
        (release_file_with_other_columns, False, "has other columns than the release"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_a_shard_with_broken_outputs_is_left_out_and_takedowns_still_apply(
    released, damage, exports_stale, reason
):
    settings, _, first = released
    rows = release_table(first).to_pylist()
    shards = list(dict.fromkeys(row["shard_id"] for row in rows))
    assert len(shards) >= 2
    broken, target = shards[0], next(row for row in rows if row["shard_id"] == shards[1])
    if exports_stale:  # the exports must run again (and read their inputs)
        settings = release_settings(
            settings, rows_per_file=6, row_group_size=4, training_shards=True, license="v2"
        )
    with Pipeline.open(settings) as pipeline:
        damage(pipeline, broken)
        request_id = request_takedown(pipeline, [target["url"]], [], reason="r")
        again = publish_release(pipeline)
    assert reason in again.excluded[broken]
    assert set(again.excluded) == {broken}
    assert again.takedowns_applied == [request_id]
    expected = {
        r["face_id"] for r in rows
        if r["shard_id"] != broken and r["image_sha256"] != target["image_sha256"]
    }  # fmt: skip
    assert {r["face_id"] for r in release_table(again).to_pylist()} == expected
    with open(f"{again.release_uri}/manifest.json") as handle:
        assert reason in json.load(handle)["excluded"][broken]
    release = Path(again.release_uri)
    assert not list(release.rglob(f"*{PARTIAL_MARKER}*"))
    # no file left behind that the manifest does not name
    assert {f"data/{p.name}" for p in (release / "data").iterdir()} == {
        entry["path"] for entry in again.manifest["files"]
    }


def test_a_truncated_shard_export_is_exported_again(released):
    settings, _, first = released
    shard = release_table(first).column("shard_id")[0].as_py()
    with Pipeline.open(settings) as pipeline:
        path = Path(pipeline.store.shard_path(shard, "release.parquet"))
        path.write_bytes(path.read_bytes()[:100])
        again = publish_release(pipeline)
        attempt = pipeline.state.get_stage(shard, "export").attempt
    assert again.excluded == {} and attempt == 2
    assert sorted(release_table(again)["face_id"].to_pylist()) == sorted(
        release_table(first)["face_id"].to_pylist()
    )


def test_a_shard_whose_detect_ran_on_an_older_fetch_is_left_out_as_stale(released):
    settings, _, first = released
    rows = release_table(first).to_pylist()
    target = rows[0]
    shard = target["shard_id"]
    with Pipeline.open(settings) as pipeline:
        request_id = request_takedown(pipeline, [], [target["image_sha256"]], reason="r")
        pipeline.run("fetch", shard, force=True)  # the image's row is taken_down now
        again = publish_release(pipeline)
        assert again.excluded == {
            shard: f"detect of shard {shard} ran on other fetch outputs than there are now"
            " (it is stale): run detect again"
        }
        assert again.takedowns_applied == [request_id]
        for stage in ("detect", "attribute", "caption"):
            pipeline.run(stage, shard)
        fixed = publish_release(pipeline)
    assert fixed.excluded == {}
    assert {r["face_id"] for r in release_table(fixed).to_pylist()} == {
        r["face_id"] for r in rows if r["image_sha256"] != target["image_sha256"]
    }


# -- a killed publish ---------------------------------------------------------------------------


@pytest.mark.slow
def test_the_next_publish_removes_what_a_killed_publish_left(released):
    """Kill a real publish process right before it renames its first release file (it waits
    on a lock the test holds there), then publish again."""
    settings, _, first = released
    settings = release_settings(
        settings, rows_per_file=6, row_group_size=4, training_shards=True, license="v2"
    )  # every export runs again, so the publish takes a while before it writes files
    release = Path(first.release_uri)
    with Pipeline.open(settings) as pipeline:
        engine = pipeline.state.engine
        last = pipeline.state.list_shards()[-1].shard_id
        with engine.connect() as export_row, engine.connect() as attempt_row:
            # 1. the publish stops at the last shard's export ...
            export_row.execute(
                sa.text(
                    "SELECT 1 FROM shard_stages WHERE shard_id = :s AND stage = 'export' FOR UPDATE"
                ),
                {"s": last},
            )
            killed = start_cli(["publish", "--no-report"], settings)
            try:
                assert wait_for(lambda: sessions_waiting_on(engine, "shard_stages") == 1, 120)
                # 2. ... we hold its publish attempt, so it stops again at its first rename
                attempt = attempt_row.execute(
                    sa.text("SELECT max(attempt) FROM release_attempts")
                ).scalar()
                attempt_row.execute(
                    sa.text("SELECT 1 FROM release_attempts WHERE attempt = :a FOR UPDATE"),
                    {"a": attempt},
                )
                export_row.rollback()
                assert wait_for(lambda: sessions_waiting_on(engine, "release_attempts") == 1, 120)
                leftovers = list(release.rglob(f"*{PARTIAL_MARKER}release-{attempt}-*"))
                assert leftovers, "the publish had no temporary file when it was killed"
            finally:
                os.killpg(killed.pid, signal.SIGKILL)
                killed.wait()
            attempt_row.rollback()
        again = publish_release(pipeline)
    assert not any(path.exists() for path in leftovers)
    assert not list(release.rglob(f"*{PARTIAL_MARKER}*"))
    assert again.excluded == {} and again.rows == first.rows
    for entry in again.manifest["files"]:
        assert sha256_file(release / entry["path"]) == entry["sha256"]
