"""The fetch stage against a real loopback HTTP server serving real images and faults."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support.sampledata import encode, write_source
from support.samplesite import Route, SampleSite

from facecaption.core.pipeline import Pipeline
from facecaption.core.writers import read_webdataset
from facecaption.settings import Settings


def fetch_source(settings: Settings, source: Path) -> tuple[pa.Table, dict, dict]:
    """Plan `source` as one shard, fetch it; return (fetch.parquet, tar samples, state)."""
    with Pipeline.open(settings) as pipeline:
        [shard_id] = pipeline.select_shards([str(source)])
        outcome = pipeline.run("fetch", shard_id)
        table = pq.read_table(outcome.artifacts["fetch.parquet"]["uri"])
        with open(outcome.artifacts["fetch.tar"]["uri"], "rb") as handle:
            samples = read_webdataset(handle)
        state = pipeline.state.get_stage(shard_id, "fetch")
    return table, samples, state


def routes_source(tmp_path: Path, site: SampleSite, paths: list[str]) -> Path:
    table = pa.table({"url": [site.url(p) for p in paths], "caption": paths})
    pq.write_table(table, tmp_path / "source.parquet")
    return tmp_path / "source.parquet"


def test_fetch_gives_every_sample_row_its_typed_status(tmp_path, settings, sample, sample_site):
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    table, samples, state = fetch_source(settings, source)
    statuses = table.column("status").to_pylist()
    assert statuses == [row.expected_status for row in sample]
    assert table.column("caption").to_pylist() == [row.caption for row in sample]
    assert table.column("sample_id").to_pylist() == [str(1000 + i) for i in range(len(sample))]
    assert state.status == "done"
    assert state.counts["rows"] == len(sample)
    assert state.counts["ok"] == statuses.count("ok") == len(samples)
    http = dict(
        zip(table.column("url").to_pylist(), table.column("http_status").to_pylist(), strict=True)
    )
    assert http[sample_site.url("gone.jpg")] == 404
    assert http[sample_site.url("broken-server.jpg")] == 500


def test_fetch_keeps_original_bytes_and_describes_them(tmp_path, settings, sample, sample_site):
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    table, samples, _ = fetch_source(settings, source)
    rows = {r["key"]: r for r in table.to_pylist()}
    served = {row.path: row.route.body for row in sample if row.route is not None}
    for key, files in samples.items():
        record = rows[key]
        meta = json.loads(files["json"])
        [ext] = [e for e in files if e != "json"]
        body = files[ext]
        path = record["url"].split("/", 3)[3]
        assert body == served[path], f"{path} was re-encoded or altered"
        assert record["sha256"] == meta["sha256"] == hashlib.sha256(body).hexdigest()
        assert record["bytes"] == len(body)
        with Image.open(io.BytesIO(body)) as image:
            assert (record["width"], record["height"]) == image.size
            assert record["format"] == image.format
        assert meta["url"] == record["url"] and meta["caption"] == record["caption"]
    by_path = {r["url"].rsplit("/", 2)[-1]: r for r in rows.values()}
    assert by_path["rotated_progressive.jpg"]["exif_orientation"] == 6
    assert by_path["cmyk.jpg"]["mode"] == "CMYK"
    assert by_path["gradient16.png"]["mode"].startswith("I;16")
    assert by_path["animated.gif"]["format"] == "GIF"
    assert by_path["small.webp"]["format"] == "WEBP"


def test_fetch_marks_same_bytes_in_a_shard_as_duplicate(tmp_path, settings, sample, sample_site):
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    table, samples, _ = fetch_source(settings, source)
    rows = table.to_pylist()
    duplicate = next(r for r in rows if r["status"] == "duplicate")
    original = next(r for r in rows if r["sha256"] == duplicate["sha256"] and r is not duplicate)
    assert duplicate["duplicate_of"].endswith(f"/{original['key']}")
    assert duplicate["key"] not in samples and original["key"] in samples


def test_fetch_times_out_a_slow_server_and_a_trickling_body(tmp_path, settings):
    body = encode(Image.new("RGB", (64, 64), "red"), "PNG") + b"\0" * 20_000
    routes = {
        "slow.png": Route(body, "image/png", delay_s=settings.fetch.total_timeout_s + 1),
        "trickle.png": Route(body, "image/png", trickle_s=0.25),  # ~5 s for the whole body
    }
    settings = settings.model_copy(
        update={
            "fetch": settings.fetch.model_copy(
                update={"retries": 0, "read_timeout_s": 2, "total_timeout_s": 1.5}
            )
        }
    )
    with SampleSite(routes) as site:
        table, _, _ = fetch_source(settings, routes_source(tmp_path, site, list(routes)))
    assert table.column("status").to_pylist() == ["timeout", "timeout"]


def test_fetch_retries_transient_failures_only(tmp_path, settings):
    png = encode(Image.new("RGB", (32, 32), "blue"), "PNG")
    routes = {
        "flaky.png": Route(png, "image/png", fail_first=2),
        "down.png": Route(b"no", "text/plain", status=500),
        "forbidden.png": Route(b"no", "text/plain", status=403),
    }
    with SampleSite(routes) as site:
        table, samples, _ = fetch_source(
            settings, routes_source(tmp_path, site, [*routes, "missing.png"])
        )
        hits = dict(site.hits)
    rows = {r["url"].rsplit("/", 1)[1]: r for r in table.to_pylist()}
    attempts = settings.fetch.retries + 1
    assert rows["flaky.png"]["status"] == "ok" and rows["flaky.png"]["attempts"] == 3
    assert rows["down.png"]["status"] == "http_error" and hits["down.png"] == attempts
    assert rows["forbidden.png"]["http_status"] == 403 and hits["forbidden.png"] == 1
    assert rows["missing.png"]["http_status"] == 404 and hits["missing.png"] == 1
    assert len(samples) == 1


def test_fetch_reports_short_bodies_and_size_limits(tmp_path, settings):
    png = encode(Image.new("RGB", (300, 200), "green"), "PNG")
    big = encode(Image.new("RGB", (4000, 3000), "white"), "PNG")
    routes = {
        "short.png": Route(png, "image/png", declared_length=len(png) + 5000),
        "large.png": Route(png + b"\0" * 50_000, "image/png"),
        "large-chunked.png": Route(png + b"\0" * 50_000, "image/png", chunked=True),
        "many-pixels.png": Route(big, "image/png"),
    }
    limits = settings.fetch.model_copy(
        update={"retries": 0, "max_bytes": 46_000, "max_pixels": 1_000_000}
    )
    with SampleSite(routes) as site:
        table, _, _ = fetch_source(
            settings.model_copy(update={"fetch": limits}),
            routes_source(tmp_path, site, list(routes)),
        )
    rows = {r["url"].rsplit("/", 1)[1]: r for r in table.to_pylist()}
    assert rows["short.png"]["status"] == "connection_error"
    assert rows["large.png"]["status"] == "too_large"
    assert "Content-Length" in rows["large.png"]["error"]
    assert rows["large-chunked.png"]["status"] == "too_large"
    assert "body exceeds" in rows["large-chunked.png"]["error"]
    assert rows["many-pixels.png"]["status"] == "too_large"
    assert "pixels" in rows["many-pixels.png"]["error"]


def test_fetch_marks_null_and_non_string_urls_invalid(tmp_path, settings):
    table = pa.table({"URL": [None, "", "   "], "TEXT": ["a", None, "c"]})
    pq.write_table(table, tmp_path / "nulls.parquet")
    result, samples, state = fetch_source(settings, tmp_path / "nulls.parquet")
    assert result.column("status").to_pylist() == ["invalid_url"] * 3
    assert result.column("caption").to_pylist() == ["a", None, "c"]
    assert samples == {} and state.status == "done"


@pytest.mark.parametrize("size", [0, 1])
def test_fetch_handles_empty_and_single_row_shards(tmp_path, settings, size):
    with SampleSite({"a.png": Route(encode(Image.new("L", (8, 8)), "PNG"), "image/png")}) as site:
        source = routes_source(tmp_path, site, ["a.png"] * size)
        if size == 0:
            with Pipeline.open(settings) as pipeline:
                assert pipeline.select_shards([str(source)]) == []
            return
        table, samples, _ = fetch_source(settings, source)
    assert table.column("status").to_pylist() == ["ok"] and len(samples) == 1


@pytest.mark.parametrize("timeout_retries", [0, 1])
def test_timeouts_have_their_own_retry_budget(tmp_path, settings, timeout_retries):
    body = encode(Image.new("RGB", (16, 16), "red"), "PNG")
    routes = {"slow.png": Route(body, "image/png", delay_s=2)}
    limits = settings.fetch.model_copy(
        update={"retries": 3, "timeout_retries": timeout_retries, "total_timeout_s": 0.5}
    )
    with SampleSite(routes) as site:
        table, _, _ = fetch_source(
            settings.model_copy(update={"fetch": limits}),
            routes_source(tmp_path, site, list(routes)),
        )
        hits = site.hits["slow.png"]
    [row] = table.to_pylist()
    assert row["status"] == "timeout"
    assert row["attempts"] == hits == timeout_retries + 1
