"""The release: FaceCaption-compatible parquet, manifest, training shards, incremental
re-export and takedowns, over a real pipeline run on the loopback sample site."""

from __future__ import annotations

import hashlib
import io
import json
from urllib.parse import urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from PIL import Image
from support.sampledata import write_source

from facecaption.core.pipeline import Pipeline
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
    settings, shard_ids, first = released
    with Pipeline.open(settings) as pipeline, pipeline.state.claim(shard_ids[0], "export"):
        again = publish_release(pipeline)
    assert again.rows == first.rows and again.excluded == {}
    assert again.files_written == []


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
