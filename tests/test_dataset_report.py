"""The dataset report: its numbers are the state DB's, and it renders in a real browser."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import sqlalchemy as sa
from PIL import Image, ImageStat
from test_release import release_table, released  # noqa: F401 (fixture)

from facecaption.core.pipeline import Pipeline
from facecaption.release.publish import publish_release
from facecaption.release.report import collect, write_report
from facecaption.release.takedowns import request_takedown


def report_data(path: str) -> dict:
    page = Path(path).read_text(encoding="utf-8")
    blob = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page)
    assert blob, "the report embeds its numbers"
    return json.loads(blob.group(1).replace("<\\/", "</"))


def sums(settings, stage: str) -> Counter:
    with Pipeline.open(settings) as pipeline, pipeline.state.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT counts FROM shard_stages WHERE stage = :s AND status = 'done'"),
            {"s": stage},
        )
        total: Counter = Counter()
        for (counts,) in rows:
            total.update({k: v for k, v in counts.items() if isinstance(v, int)})
        return total


def scored_crops(settings) -> int:
    """How many BRISQUE scores the exports kept: each shard's first quality_crops_per_shard
    released crops (the sample data's group photo gives one shard more than that)."""
    with Pipeline.open(settings) as pipeline, pipeline.state.engine.connect() as conn:
        released = conn.execute(
            sa.text("SELECT (counts->>'released')::int FROM shard_stages WHERE stage = 'export'")
        ).scalars()
        return sum(min(n, settings.export.quality_crops_per_shard) for n in released)


def test_report_numbers_match_the_state_db(released):  # noqa: F811
    settings, shard_ids, release = released
    with Pipeline.open(settings) as pipeline:
        path = write_report(pipeline)
        source_rows = sum(shard.num_rows for shard in pipeline.state.list_shards())
        labels: Counter = Counter()
        for shard_id in shard_ids:
            table = pq.read_table(pipeline.store.shard_path(shard_id, "attributes.parquet"))
            for row in table.to_pylist():
                if row["kept"]:
                    labels.update(row["valid_labels"])
    assert path.endswith("release/report.html")
    data = report_data(path)
    fetch, detect = sums(settings, "fetch"), sums(settings, "detect")
    assert data["funnel"] == {
        "source": source_rows,
        "fetched": fetch["ok"] + fetch["duplicate"],
        "with_faces": detect["images_with_faces"],
        "kept_faces": detect["faces_kept"],
        "attributed": sums(settings, "attribute")["kept"],
        "captioned": sums(settings, "caption")["faces"],
        "released": release.rows,
    }
    assert data["fetch_statuses"]["ok"] == fetch["ok"]
    assert sum(data["fetch_statuses"].values()) == fetch["rows"]
    assert {k: v for k, v in data["attributes"].items() if v} == dict(labels)
    assert sum(data["caption_words"]["counts"]) == data["funnel"]["captioned"]
    assert sum(data["face_min_side"]["counts"]) == detect["faces_kept"]
    assert sum(data["image_min_side"]["counts"]) == fetch["ok"]
    assert data["unique_4grams"]["template"]["captions"] == data["funnel"]["captioned"]
    assert data["unique_4grams"]["template"]["unique_4grams"] > 0
    # all the exports scored: fewer than report_max_crops
    assert data["brisque"]["crops"] == scored_crops(settings) > 0
    assert data["brisque"]["mean"] is not None
    for stage in ("fetch", "detect", "attribute", "caption", "export"):
        assert data["throughput"][stage]["attempts"] == len(shard_ids), stage
    assert data["throughput"]["fetch"]["items"] == fetch["rows"]


def test_report_shows_a_gallery_the_models_and_why_faces_were_dropped(released):  # noqa: F811
    settings, shard_ids, release = released
    settings = settings.model_copy(
        update={"export": settings.export.model_copy(update={"report_gallery_faces": 3})}
    )
    with Pipeline.open(settings) as pipeline:
        path = write_report(pipeline)
        captions, attributes, detector_ids = {}, {}, Counter()
        for shard_id in shard_ids:
            for row in pq.read_table(
                pipeline.store.shard_path(shard_id, "captions.parquet")
            ).to_pylist():
                captions[row["face_id"]] = row
            table = pq.read_table(pipeline.store.shard_path(shard_id, "attributes.parquet"))
            attributes.update({r["face_id"]: r for r in table.to_pylist()})
            faces = pq.read_table(pipeline.store.shard_path(shard_id, "faces.parquet"))
            detector_ids.update(faces.column("detector_id").to_pylist())
    page = Path(path).read_text(encoding="utf-8")
    data = report_data(path)
    gallery = data["gallery"]
    assert gallery["sampled_from"] == release.rows > 3 and len(gallery["faces"]) == 3
    assert page.count('<figure class="face">') == 3 and "base64" not in json.dumps(data)
    for face in gallery["faces"]:
        caption = captions[face["face_id"]]
        assert (face["caption"], face["raw_text"], face["fidelity"]) == (
            caption["caption"], caption["raw_text"], caption["fidelity"]
        )  # fmt: skip
        assert face["labels"] == attributes[face["face_id"]]["valid_labels"]
    for encoded in re.findall(r'<img src="data:image/jpeg;base64,([^"]+)"', page):
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= 112
    # the same sample next time
    with Pipeline.open(settings) as pipeline:
        again = report_data(write_report(pipeline))["gallery"]["faces"]
    assert [f["face_id"] for f in again] == [f["face_id"] for f in gallery["faces"]]
    assert data["models"]["detect"] == {"models": dict(detector_ids), "demo": False}
    assert set(data["models"]["attribute"]["models"]) == {
        row["model_id"] for row in attributes.values()
    }
    assert data["models"]["caption"]["models"] == {"template": len(captions)}
    detect = sums(settings, "detect")
    assert data["detect"]["kept"] == detect["faces_kept"]
    assert data["detect"]["dropped"] == {
        k.removeprefix("dropped_"): v for k, v in detect.items() if k.startswith("dropped_")
    }
    assert 'id="demo-banner"' not in page and "arXiv:2407.08515" in page
    assert '#54a24b"/>' in page and '#e45756"/>' in page  # kept green, failures red


def test_the_gallery_never_shows_a_face_under_a_takedown(released):  # noqa: F811
    """The gallery's faces are released ones: a takedown re-exports the shard, and the face it
    covers leaves the gallery with its thumbnail."""
    settings, _, release = released
    rows = {row["face_id"]: row for row in release_table(release).to_pylist()}
    with Pipeline.open(settings) as pipeline:
        shown = [face["face_id"] for face in collect(pipeline)["gallery"]["faces"]]
        assert shown and set(shown) <= set(rows)
        doomed = rows[shown[0]]
        request_takedown(pipeline, [doomed["url"]], [], reason="subject's request")
        after = publish_release(pipeline)
        gallery = collect(pipeline)["gallery"]
        with pipeline.state.engine.connect() as conn:
            stored = conn.execute(
                sa.text(
                    "SELECT stats->'thumbnails' FROM stage_stats WHERE shard_id = :s"
                    " AND stage = 'export'"
                ),
                {"s": doomed["shard_id"]},
            ).scalar_one()
    kept = {row["face_id"] for row in release_table(after).to_pylist()}
    assert doomed["face_id"] not in kept and doomed["face_id"] not in stored
    assert gallery["faces"] and {face["face_id"] for face in gallery["faces"]} <= kept
    assert gallery["sampled_from"] == after.rows


def test_report_renders_in_chromium_without_errors(released, browser, page_errors, tmp_path):  # noqa: F811
    settings, _, release = released
    with Pipeline.open(settings) as pipeline:
        path = write_report(pipeline, tmp_path / "out" / "report.html")
    with browser() as chromium:
        page = chromium.new_page(viewport={"width": 1200, "height": 900})
        errors = page_errors(page)
        page.goto(Path(path).as_uri())
        title = page.title()
        funnel = page.locator("#funnel tbody tr").all_inner_texts()
        charts = page.locator("svg").count()
        shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    shot.save(tmp_path / "report.png")  # kept with the test run for a look
    assert title == "facecaption dataset report"
    assert len(funnel) == 7
    assert funnel[-1].split("\t")[:2] == ["rows released", str(release.rows)]
    assert charts >= 7
    assert errors == []
    stats = ImageStat.Stat(shot.convert("L"))
    assert stats.stddev[0] > 10  # not a blank page
    assert len(shot.getcolors(maxcolors=1 << 20) or []) > 50  # text, bars of several colours


def test_report_reads_no_shard_artifact_and_samples_quality_boundedly_and_stably(released):  # noqa: F811
    """The report comes from what the exports stored: with every shard artifact deleted it
    says exactly the same, gallery pictures and models used included. Its BRISQUE sample is
    the same crops each time, at most `report_max_crops` of them."""
    settings, shard_ids, release = released
    with Pipeline.open(settings) as pipeline:
        first = collect(pipeline)
        shutil.rmtree(Path(pipeline.store.root) / "shards")
        again = collect(pipeline)
        bounded = collect(pipeline, max_crops=2)
        bounded_again = collect(pipeline, max_crops=2)
    assert {k: v for k, v in again.items() if k != "generated_at"} == {
        k: v for k, v in first.items() if k != "generated_at"
    }
    assert first["exported_shards"] == len(shard_ids)
    assert first["gallery"]["faces"] and first["models"]["detect"]["models"]
    assert all(
        face["thumbnail"].startswith("data:image/jpeg") for face in first["gallery"]["faces"]
    )
    assert first["brisque"]["crops"] == scored_crops(settings) > 2
    assert bounded["brisque"]["crops"] == 2
    assert bounded["brisque"] == bounded_again["brisque"]


def test_shards_exported_before_statistics_were_kept_get_them_once(released):  # noqa: F811
    settings, shard_ids, _ = released
    one_crop = settings.model_copy(
        update={
            "export": settings.export.model_copy(
                update={"quality_crops_per_shard": 1, "gallery_faces_per_shard": 1}
            )
        }
    )
    with Pipeline.open(one_crop) as pipeline:
        first = collect(pipeline)
        with pipeline.state.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM stage_stats"))
        backfilled = collect(pipeline)
        with pipeline.state.engine.connect() as conn:
            stored = conn.execute(sa.text("SELECT count(*) FROM stage_stats")).scalar()
            thumbnails = conn.execute(
                sa.text("SELECT (SELECT count(*) FROM jsonb_object_keys(stats->'thumbnails'))"
                        " FROM stage_stats")
            ).scalars().all()  # fmt: skip
        assert pipeline.state.finished_stats("export")[1] == {}
    assert stored == len(shard_ids)
    assert max(thumbnails) == 1 and backfilled["models"] == first["models"]
    for key in ("funnel", "image_min_side", "face_min_side", "attributes", "caption_words",
                "fidelity", "unique_4grams"):  # fmt: skip
        assert backfilled[key] == first[key], key
    # worked out again with one crop per shard: bounded by the setting
    assert 0 < backfilled["brisque"]["crops"] <= len(shard_ids) < first["brisque"]["crops"]
    gallery = backfilled["gallery"]
    assert 0 < gallery["candidates"] <= len(shard_ids) < first["gallery"]["candidates"]
    assert len(gallery["faces"]) == gallery["candidates"]  # fewer than report_gallery_faces
