"""The fetch stage's manners against real loopback HTTP: opt-outs, robots.txt, blocked
addresses, Retry-After, per-host limits, redirects, formats, re-runs, cross-shard dedup, DNS.

Every request here goes to loopback (127.0.0.0/8, ::1, localhost), even where the guard under
test would fail: blocked addresses are other loopback addresses outside the allow-list.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from aiohttp.resolver import ThreadedResolver
from conftest import LOOPBACK_FETCH
from PIL import Image
from support.sampledata import encode
from support.samplesite import Route, SampleSite
from test_fetch import fetch_source, routes_source

from facecaption.core.pipeline import Pipeline
from facecaption.core.writers import read_webdataset
from facecaption.fetch.web.downloader import Download, Downloader
from facecaption.fetch.web.guard import AddressGuard, GuardedResolver
from facecaption.settings import FetchSettings, Settings


def png(shade: int = 0, size: int = 16) -> bytes:
    return encode(Image.new("L", (size, size), shade), "PNG")


def with_fetch(settings: Settings, **limits: Any) -> Settings:
    return settings.model_copy(update={"fetch": settings.fetch.model_copy(update=limits)})


def by_path(table: pa.Table) -> dict[str, dict[str, Any]]:
    return {r["url"].rsplit("/", 1)[1]: r for r in table.to_pylist()}


def urls_source(tmp_path: Path, urls: list[str]) -> Path:
    table = pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]})
    pq.write_table(table, tmp_path / "urls.parquet")
    return tmp_path / "urls.parquet"


def limits(**overrides: Any) -> FetchSettings:
    """Downloader limits for loopback tests, like the `settings` fixture's."""
    return FetchSettings(**{**LOOPBACK_FETCH, **overrides})


def download_all(urls: list[str], fetch: FetchSettings) -> tuple[list[Download], float]:
    """Download `urls` concurrently with one Downloader; the results and the wall time."""

    async def main() -> list[Download]:
        async with Downloader(fetch) as downloader:
            return await asyncio.gather(*(downloader.get(url) for url in urls))

    began = time.monotonic()
    results = asyncio.run(main())
    return results, time.monotonic() - began


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# -- X-Robots-Tag -----------------------------------------------------------------------------


def test_fetch_marks_noai_images_opted_out_without_reading_the_body(tmp_path, settings):
    # 200 KB in 1 KiB pieces 20 ms apart: about 4 s to read in full
    body = b"\0" * 200_000
    routes = {
        "noai.png": Route(body, "image/png", trickle_s=0.02, headers={"X-Robots-Tag": "noai"})
    }
    with SampleSite(routes) as site:
        table, samples, _ = fetch_source(settings, routes_source(tmp_path, site, ["noai.png"]))
        hung_up = wait_for(lambda: "noai.png" in site.hung_up, timeout_s=6)
    [row] = table.to_pylist()
    assert row["status"] == "opted_out"
    assert "noai" in row["error"]
    assert row["bytes"] is None and row["sha256"] is None
    assert samples == {}
    assert hung_up, "the client read the opted-out body instead of hanging up"


def test_fetch_ignores_x_robots_tag_scoped_to_another_bot(tmp_path, settings):
    image = png(120)
    routes = {"other.png": Route(image, "image/png", headers={"X-Robots-Tag": "googlebot: noai"})}
    with SampleSite(routes) as site:
        table, samples, _ = fetch_source(settings, routes_source(tmp_path, site, ["other.png"]))
    [row] = table.to_pylist()
    assert row["status"] == "ok"
    assert samples[row["key"]]["png"] == image


# -- robots.txt -------------------------------------------------------------------------------


def test_fetch_skips_urls_robots_txt_disallows(tmp_path, settings):
    routes = {
        "robots.txt": Route(b"User-agent: *\nDisallow: /private/\n", "text/plain"),
        "private/x.png": Route(png(1), "image/png"),
        "public/x.png": Route(png(2), "image/png"),
    }
    with SampleSite(routes) as site:
        table, samples, _ = fetch_source(
            settings, routes_source(tmp_path, site, ["private/x.png", "public/x.png"])
        )
        hits = dict(site.hits)
    assert table.column("status").to_pylist() == ["robots_disallowed", "ok"]
    assert not any(path.startswith("private/") for path in hits)
    assert hits["public/x.png"] == 1
    assert list(samples) == ["000000001"]


def test_fetch_reads_robots_txt_once_per_host(tmp_path, settings):
    paths = [f"img{i}.png" for i in range(20)]
    routes = {path: Route(png(i * 10), "image/png") for i, path in enumerate(paths)}
    routes["robots.txt"] = Route(b"User-agent: *\nDisallow: /nothing-here/\n", "text/plain")
    with SampleSite(routes) as site:
        table, _, _ = fetch_source(settings, routes_source(tmp_path, site, paths))
        hits = dict(site.hits)
    assert table.column("status").to_pylist() == ["ok"] * 20
    assert hits["robots.txt"] == 1


def test_fetch_marks_robots_unavailable_on_a_robots_server_error(tmp_path, settings):
    routes = {
        "robots.txt": Route(b"down", "text/plain", status=503),
        "a.png": Route(png(), "image/png"),
    }
    with SampleSite(routes) as site:
        table, samples, _ = fetch_source(settings, routes_source(tmp_path, site, ["a.png"]))
        hits = dict(site.hits)
    [row] = table.to_pylist()
    assert row["status"] == "robots_unavailable"
    assert row["http_status"] == 503
    assert "a.png" not in hits and samples == {}


def test_fetch_ignores_robots_txt_when_told_to(tmp_path, settings):
    image = png(7)
    routes = {
        "robots.txt": Route(b"User-agent: *\nDisallow: /private/\n", "text/plain"),
        "private/x.png": Route(image, "image/png"),
    }
    settings = with_fetch(settings, respect_robots_txt=False)
    with SampleSite(routes) as site:
        table, samples, _ = fetch_source(settings, routes_source(tmp_path, site, ["private/x.png"]))
        hits = dict(site.hits)
    [row] = table.to_pylist()
    assert row["status"] == "ok"
    assert samples[row["key"]]["png"] == image
    assert "robots.txt" not in hits


def test_fetch_treats_a_missing_robots_txt_as_allow_all(tmp_path, settings):
    routes = {"private/x.png": Route(png(), "image/png")}  # robots.txt answers 404
    with SampleSite(routes) as site:
        table, _, _ = fetch_source(settings, routes_source(tmp_path, site, ["private/x.png"]))
        hits = dict(site.hits)
    assert table.column("status").to_pylist() == ["ok"]
    assert hits["robots.txt"] == 1 and hits["private/x.png"] == 1


def test_fetch_reads_a_robots_txt_that_arrives_in_pieces(tmp_path, settings):
    robots = b"# padding\n" * 300 + b"User-agent: *\nDisallow: /private/\n"  # ~3 KB
    routes = {
        "robots.txt": Route(robots, "text/plain", trickle_s=0.05),  # 1 KiB pieces
        "private/x.png": Route(png(), "image/png"),
    }
    with SampleSite(routes) as site:
        table, _, _ = fetch_source(settings, routes_source(tmp_path, site, ["private/x.png"]))
        hits = dict(site.hits)
    assert table.column("status").to_pylist() == ["robots_disallowed"]
    assert "private/x.png" not in hits


# -- blocked addresses (all loopback: the guard under test keeps them out) --------------------


def test_fetch_refuses_addresses_outside_the_allow_list(tmp_path, settings):
    settings = with_fetch(settings, allow_networks=["127.0.0.1/32"])
    with SampleSite({"a.png": Route(png(), "image/png")}, host="127.0.0.2") as site:
        table, samples, _ = fetch_source(settings, routes_source(tmp_path, site, ["a.png"]))
        hits = dict(site.hits)
    [row] = table.to_pylist()
    assert row["status"] == "blocked_address"
    assert row["error"] == "host is a loopback address"  # the class, not the address
    assert hits == {} and samples == {}


def test_fetch_refuses_a_redirect_to_a_blocked_address(tmp_path, settings):
    settings = with_fetch(settings, allow_networks=["127.0.0.1/32"])
    with (
        SampleSite({"a.png": Route(png(), "image/png")}, host="127.0.0.2") as inner,
        SampleSite({"r.png": Route(status=302, headers={"Location": inner.url("a.png")})}) as outer,
    ):
        table, samples, _ = fetch_source(settings, routes_source(tmp_path, outer, ["r.png"]))
        inner_hits, outer_hits = dict(inner.hits), dict(outer.hits)
    [row] = table.to_pylist()
    assert row["status"] == "blocked_address"
    assert outer_hits["r.png"] == 1
    assert inner_hits == {} and samples == {}


def test_fetch_refuses_ipv6_loopback_and_unspecified_literals(tmp_path, settings):
    settings = with_fetch(settings, allow_networks=["127.0.0.1/32"])
    source = urls_source(tmp_path, ["http://[::1]:1/x.png", "http://0.0.0.0:1/x.png"])
    table, _, _ = fetch_source(settings, source)
    assert table.column("status").to_pylist() == ["blocked_address"] * 2
    assert table.column("attempts").to_pylist() == [1, 1]


def test_fetch_refuses_a_name_resolving_to_a_blocked_address(tmp_path, settings):
    # localhost resolves to 127.0.0.1 (and ::1 on some systems): both outside this allow-list
    settings = with_fetch(settings, allow_networks=["127.0.0.2/32"])
    with SampleSite({"a.png": Route(png(), "image/png")}) as site:
        source = urls_source(tmp_path, [f"http://localhost:{site.port}/a.png"])
        table, samples, _ = fetch_source(settings, source)
        hits = dict(site.hits)
    [row] = table.to_pylist()
    assert row["status"] == "blocked_address"
    assert "localhost" in row["error"]
    assert hits == {} and samples == {}


# -- Retry-After ------------------------------------------------------------------------------


def test_download_waits_out_a_429_retry_after(tmp_path):
    routes = {
        "a.png": Route(
            png(), "image/png", fail_first=1, fail_status=429, fail_headers={"Retry-After": "1"}
        )
    }
    with SampleSite(routes) as site:
        [result], elapsed = download_all([site.url("a.png")], limits())
        hits = dict(site.hits)
    assert result.status == "ok" and result.body == routes["a.png"].body
    assert result.attempts == 2 and hits["a.png"] == 2
    assert elapsed >= 0.99


def test_download_does_not_wait_out_a_retry_after_beyond_the_maximum(tmp_path):
    routes = {
        "a.png": Route(
            png(), "image/png", fail_first=1, fail_status=429, fail_headers={"Retry-After": "30"}
        )
    }
    with SampleSite(routes) as site:
        [result], elapsed = download_all([site.url("a.png")], limits(retry_after_max_s=2))
        hits = dict(site.hits)
    assert result.status == "http_error" and result.http_status == 429
    assert result.attempts == 1 and hits["a.png"] == 1
    assert result.retry_after_s == 30
    assert elapsed < 2


def test_download_waits_out_a_retry_after_longer_than_the_attempt_deadline():
    routes = {
        "a.png": Route(
            png(), "image/png", fail_first=1, fail_status=429, fail_headers={"Retry-After": "2"}
        )
    }
    with SampleSite(routes) as site:
        [result], _ = download_all(
            [site.url("a.png")], limits(total_timeout_s=1.5, retries=1, retry_after_max_s=60)
        )
        hits = dict(site.hits)
    assert result.status == "ok" and result.attempts == 2
    assert hits["a.png"] == 2


# -- per-host limits --------------------------------------------------------------------------


def test_fetch_keeps_per_host_concurrency(tmp_path, settings):
    paths = [f"img{i}.png" for i in range(12)]
    routes = {path: Route(png(i * 20), "image/png", delay_s=0.2) for i, path in enumerate(paths)}
    settings = with_fetch(settings, per_host_concurrency=2)
    with SampleSite(routes) as site:
        table, _, _ = fetch_source(settings, routes_source(tmp_path, site, paths))
        most = site.max_in_flight
    assert table.column("status").to_pylist() == ["ok"] * 12
    assert most == 2


def test_download_limits_each_host_separately():
    routes = {f"img{i}.png": Route(png(i), "image/png", delay_s=0.4) for i in range(4)}
    with (
        SampleSite(routes, host="127.0.0.1") as first,
        SampleSite(routes, host="127.0.0.3") as second,
    ):
        together = 0
        done = threading.Event()

        def watch() -> None:
            nonlocal together
            while not done.is_set():
                together = max(together, first.in_flight + second.in_flight)
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            urls = [site.url(path) for site in (first, second) for path in routes]
            results, _ = download_all(urls, limits(per_host_concurrency=2))
        finally:
            done.set()
            watcher.join()
        most = (first.max_in_flight, second.max_in_flight)
    assert [r.status for r in results] == ["ok"] * 8
    assert most == (2, 2)
    assert together > 2, "the two hosts shared one limit"


def test_download_keeps_the_per_host_rate():
    routes = {f"img{i}.png": Route(png(i), "image/png") for i in range(6)}
    with SampleSite(routes) as site:
        results, elapsed = download_all(
            [site.url(path) for path in routes], limits(per_host_rate=10)
        )
    assert [r.status for r in results] == ["ok"] * 6
    assert elapsed >= 0.45


def test_download_does_not_time_out_requests_queued_for_a_host_slot():
    # each answer takes 0.5 s, well within the 1.5 s deadline; one at a time, 6 take 3 s
    routes = {f"img{i}.png": Route(png(i), "image/png", delay_s=0.5) for i in range(6)}
    with SampleSite(routes) as site:
        results, _ = download_all(
            [site.url(path) for path in routes],
            limits(per_host_concurrency=1, total_timeout_s=1.5, retries=0),
        )
    assert [r.status for r in results] == ["ok"] * 6


# -- redirects --------------------------------------------------------------------------------


def test_fetch_follows_a_redirect_to_the_target_bytes(tmp_path, settings):
    target = png(200, size=24)
    routes = {
        "hop.png": Route(status=302, headers={"Location": "/target.png"}),
        "target.png": Route(target, "image/png"),
    }
    with SampleSite(routes) as site:
        table, samples, _ = fetch_source(settings, routes_source(tmp_path, site, ["hop.png"]))
        hits = dict(site.hits)
    [row] = table.to_pylist()
    assert row["status"] == "ok" and row["http_status"] == 200
    assert samples[row["key"]]["png"] == target
    assert (row["width"], row["height"]) == (24, 24)
    assert hits["hop.png"] == 1 and hits["target.png"] == 1


def test_fetch_gives_up_on_a_redirect_loop(tmp_path, settings):
    routes = {
        "a.png": Route(status=302, headers={"Location": "/b.png"}),
        "b.png": Route(status=302, headers={"Location": "/a.png"}),
    }
    with SampleSite(routes) as site:
        table, _, _ = fetch_source(settings, routes_source(tmp_path, site, ["a.png"]))
        hits = dict(site.hits)
    [row] = table.to_pylist()
    assert row["status"] == "http_error"
    assert "redirects" in row["error"]
    assert row["attempts"] == 1
    assert hits["a.png"] + hits["b.png"] == settings.fetch.max_redirects + 1


def test_fetch_refuses_a_redirect_to_another_scheme(tmp_path, settings):
    routes = {"a.png": Route(status=302, headers={"Location": "ftp://127.0.0.1/a.png"})}
    with SampleSite(routes) as site:
        table, _, _ = fetch_source(settings, routes_source(tmp_path, site, ["a.png"]))
    [row] = table.to_pylist()
    assert row["status"] == "invalid_redirect"
    assert row["http_status"] == 302
    assert "ftp" in row["error"]


# -- formats ----------------------------------------------------------------------------------


def test_fetch_keeps_tiff_and_bmp_and_refuses_ico(tmp_path, settings):
    image = Image.new("RGB", (20, 10), (10, 200, 30))
    bodies = {
        "a.tif": encode(image, "TIFF"),
        "a.bmp": encode(image, "BMP"),
        "a.ico": encode(image, "ICO"),
    }
    routes = {path: Route(body, "image/x-unknown") for path, body in bodies.items()}
    with SampleSite(routes) as site:
        table, samples, _ = fetch_source(settings, routes_source(tmp_path, site, list(routes)))
    rows = by_path(table)
    assert rows["a.tif"]["status"] == "ok" and rows["a.tif"]["format"] == "TIFF"
    assert rows["a.bmp"]["status"] == "ok" and rows["a.bmp"]["format"] == "BMP"
    assert rows["a.ico"]["status"] == "unsupported_format"
    assert rows["a.ico"]["format"] == "ICO"
    assert samples[rows["a.tif"]["key"]]["tif"] == bodies["a.tif"]
    assert samples[rows["a.bmp"]["key"]]["bmp"] == bodies["a.bmp"]
    assert rows["a.ico"]["key"] not in samples


# -- re-runs and dedup ------------------------------------------------------------------------


def test_fetch_rerun_fetches_only_transient_failures(tmp_path, settings):
    attempts = settings.fetch.retries + 1
    ok, flaky = png(10), png(250)
    routes = {
        "ok.png": Route(ok, "image/png"),
        "flaky.png": Route(flaky, "image/png", fail_first=attempts, fail_status=500),
    }
    paths = ["ok.png", "missing.png", "flaky.png"]
    with SampleSite(routes) as site, Pipeline.open(settings) as pipeline:
        [shard_id] = pipeline.select_shards([str(routes_source(tmp_path, site, paths))])
        first = pipeline.run("fetch", shard_id)
        first_rows = by_path(pq.read_table(first.artifacts["fetch.parquet"]["uri"]))
        hits_after_first = dict(site.hits)
        second = pipeline.run("fetch", shard_id, force=True)
        rows = by_path(pq.read_table(second.artifacts["fetch.parquet"]["uri"]))
        with open(second.artifacts["fetch.tar"]["uri"], "rb") as handle:
            samples = read_webdataset(handle)
        hits = dict(site.hits)
    assert first_rows["flaky.png"]["status"] == "http_error"
    assert first_rows["flaky.png"]["http_status"] == 500
    assert second.counts["fetched"] == 1 and second.counts["reused"] == 2
    assert rows["flaky.png"]["status"] == "ok"
    assert rows["ok.png"]["status"] == "ok"
    assert rows["missing.png"]["http_status"] == 404
    assert hits["ok.png"] == hits_after_first["ok.png"] == 1
    assert hits["missing.png"] == hits_after_first["missing.png"] == 1
    assert hits["flaky.png"] == attempts + 1
    assert samples[rows["ok.png"]["key"]]["png"] == ok
    assert samples[rows["flaky.png"]["key"]]["png"] == flaky
    assert len(samples) == 2


def test_fetch_marks_bytes_kept_by_an_earlier_shard_duplicate(tmp_path, settings):
    same = png(99)
    routes = {
        "a.png": Route(same, "image/png"),
        "b.png": Route(png(1), "image/png"),
        "c.png": Route(same, "image/png"),
        "d.png": Route(png(2), "image/png"),
    }
    settings = settings.model_copy(update={"shard_size": 2})
    with SampleSite(routes) as site, Pipeline.open(settings) as pipeline:
        first_id, second_id = pipeline.select_shards(
            [str(routes_source(tmp_path, site, list(routes)))]
        )
        pipeline.run("fetch", first_id)
        second = pipeline.run("fetch", second_id)
        second_rows = by_path(pq.read_table(second.artifacts["fetch.parquet"]["uri"]))
        again = pipeline.run("fetch", first_id, force=True)
        first_rows = by_path(pq.read_table(again.artifacts["fetch.parquet"]["uri"]))
    assert second_rows["c.png"]["status"] == "duplicate"
    assert second_rows["c.png"]["duplicate_of"] == f"{first_id}/000000000"
    assert second_rows["d.png"]["status"] == "ok"
    assert first_rows["a.png"]["status"] == "ok"
    assert first_rows["a.png"]["duplicate_of"] is None


# -- DNS --------------------------------------------------------------------------------------


def test_fetch_reports_unresolvable_hosts_as_dns_errors_and_warns(tmp_path, settings):
    source = urls_source(tmp_path, [f"http://x{i}.invalid/a.png" for i in range(5)])
    with Pipeline.open(settings) as pipeline:
        [shard_id] = pipeline.select_shards([str(source)])
        outcome = pipeline.run("fetch", shard_id)
        table = pq.read_table(outcome.artifacts["fetch.parquet"]["uri"])
    assert table.column("status").to_pylist() == ["dns_error"] * 5
    assert outcome.counts["dns_error"] == 5
    assert any("dns_error" in warning for warning in outcome.warnings)


def test_guarded_resolver_resolves_each_host_once():
    class CountingResolver(ThreadedResolver):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        async def resolve(self, host, port=0, family=socket.AF_INET):
            self.calls += 1
            return await super().resolve(host, port, family)

    async def main() -> tuple[int, list]:
        inner = CountingResolver()
        resolver = GuardedResolver(AddressGuard(["127.0.0.0/8", "::1/128"]), inner=inner)
        answers = await asyncio.gather(
            *(resolver.resolve("localhost", 80, socket.AF_UNSPEC) for _ in range(10))
        )
        await resolver.close()
        return inner.calls, answers

    calls, answers = asyncio.run(main())
    assert calls == 1
    assert answers[0] and all(answer == answers[0] for answer in answers)
    assert {answer["host"] for answer in answers[0]} <= {"127.0.0.1", "::1"}
