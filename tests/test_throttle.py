"""The adaptive per-host rate against real loopback hosts with a capacity (`support.ratesite`):
a host that gets busy is asked less, a Retry-After pauses that host only, and a slow host
holds back no other. Assertions count requests and 429s on the server side, never time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from conftest import LOOPBACK_FETCH
from PIL import Image
from support.ratesite import Host, RateSite
from support.sampledata import encode
from test_fetch import fetch_source
from yarl import URL

from facecaption.core.pipeline import Pipeline
from facecaption.fetch.stage import WORKERS_PER_CONNECTION, SourceRow, Spool, fetch_rows
from facecaption.fetch.web.budget import KEY_PREFIX
from facecaption.fetch.web.throttle import HostRates
from facecaption.release.report import collect
from facecaption.settings import FetchSettings
from facecaption.state.hostrates import HostRateStore

PNG = encode(Image.new("L", (16, 16), 128), "PNG")


def image(path: str) -> tuple[bytes, str]:
    # distinct bytes per path (a tEXt chunk would do as well; the decoder ignores what follows)
    return PNG + path.encode(), "image/png"


def limits(**overrides: Any) -> FetchSettings:
    adaptive = {"per_host_rate": 200, "backoff_base_s": 0.05, "backoff_max_s": 0.2}
    return FetchSettings(**{**LOOPBACK_FETCH, **adaptive, **overrides})


def rows_for(urls: list[str]) -> list[tuple[SourceRow, URL]]:
    return [(SourceRow(i, url, None, None), URL(url)) for i, url in enumerate(urls)]


def fetch(
    tmp_path: Path, urls: list[str], fetch_limits: FetchSettings, on_record=None, hosts=None
) -> dict[int, dict[str, Any]]:
    with Spool(tmp_path / "spool") as spool:
        return asyncio.run(
            fetch_rows(
                rows_for(urls), fetch_limits, spool, on_record or (lambda record: None), hosts
            )
        )


def test_a_host_whose_capacity_drops_gets_fewer_requests(tmp_path):
    # no Retry-After: only the learned rate keeps the 429s down
    busy = Host("127.0.0.2", capacity=0)
    with RateSite([busy], image) as site:
        urls = [busy.url(f"img{i}.png") for i in range(260)]
        at_drop: dict[str, int] = {}

        def on_record(record: dict[str, Any]) -> None:
            if len(at_drop) == 0 and busy.requests >= 120:
                at_drop.update(requests=busy.requests, over=busy.over_capacity)
                busy.set_capacity(10)

        hosts = HostRates()
        records = fetch(tmp_path, urls, limits(retries=6), on_record, hosts)
        after_requests = busy.requests - at_drop["requests"]
        after_over = busy.over_capacity - at_drop["over"]
        assert site.host("127.0.0.2") is busy
    assert at_drop["over"] == 0
    figures = hosts.figures["127.0.0.2"]
    # it was asked well above 10/s before the drop, and cut after it
    assert figures.cuts >= 2
    assert figures.throttled == busy.over_capacity
    # a fixed rate at the peak would see most of its requests refused after the drop
    assert after_over <= 0.3 * after_requests, (after_over, after_requests)
    assert hosts.learned["127.0.0.2"] <= 30
    assert sum(r["status"] == "ok" for r in records.values()) >= 250


def test_retry_after_pauses_that_host_only(tmp_path):
    # the paused host answers 429 Retry-After: 2 to its second request of each second
    paused = Host("127.0.0.3", capacity=1, retry_after="2")
    other = Host("127.0.0.4", capacity=0)
    events: list[tuple[str, int]] = []
    with RateSite([paused, other], image):
        urls = [paused.url(f"p{i}.png") for i in range(4)] + [
            other.url(f"o{i}.png") for i in range(60)
        ]

        def on_record(record: dict[str, Any]) -> None:
            events.append((record["url"].split("/")[2].split(":")[0], other.requests))

        hosts = HostRates()
        records = fetch(tmp_path, urls, limits(retries=4, host_start_rate=4), on_record, hosts)
        over = paused.over_capacity
        paused_requests = paused.requests
    assert over >= 1
    figures = hosts.figures["127.0.0.3"]
    assert figures.paused_s >= 2.0 * over - 0.01
    assert hosts.figures["127.0.0.4"].paused_s == 0
    assert hosts.figures["127.0.0.4"].throttled == 0
    # while the paused host waited, the other went on: between two answers of the paused
    # host, the other host was asked many times
    paused_marks = [served for host, served in events if host == "127.0.0.3"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(paused_marks)]
    assert max(gaps, default=0) >= 5, (paused_marks, gaps)
    # every 429 cost one request, not a burst of them
    assert paused_requests <= 4 + over
    assert all(r["status"] == "ok" for r in records.values())


def test_a_slow_host_holds_back_no_other(tmp_path):
    # the slow host's rows come first; two in flight at a time, each answer takes 0.4 s
    slow = Host("127.0.0.5", capacity=0, latency_s=0.4)
    fast = Host("127.0.0.6", capacity=0)
    slow_when_fast_done: list[int] = []
    with RateSite([slow, fast], image):
        urls = [slow.url(f"s{i}.png") for i in range(30)] + [
            fast.url(f"f{i}.png") for i in range(30)
        ]
        fast_done = 0

        def on_record(record: dict[str, Any]) -> None:
            nonlocal fast_done
            if "127.0.0.6" in record["url"]:
                fast_done += 1
                if fast_done == 30:
                    slow_when_fast_done.append(slow.requests)

        fetch_limits = limits(concurrency=4, per_host_concurrency=2, host_start_rate=20)
        records = fetch(tmp_path, urls, fetch_limits, on_record)
        most_slow = slow.max_in_flight
    # first in, first out would have had every worker wait on the slow host first
    assert slow_when_fast_done and slow_when_fast_done[0] <= 10
    assert most_slow == 2
    assert all(r["status"] == "ok" for r in records.values())


def test_a_shard_keeps_its_hosts_figures(tmp_path, settings):
    # each host takes one request a second and asks for a one-second pause above it
    busy = Host("127.0.0.7", capacity=1, retry_after="1")
    quiet = Host("127.0.0.8", capacity=0)
    settings = settings.model_copy(
        update={"fetch": settings.fetch.model_copy(update={"per_host_rate": 200, "retries": 4})}
    )
    with RateSite([busy, quiet], image):
        urls = [busy.url(f"b{i}.png") for i in range(3)] + [quiet.url("q.png")]
        source = tmp_path / "source.parquet"
        pq.write_table(pa.table({"url": urls, "caption": ["c"] * len(urls)}), source)
        table, _, state = fetch_source(settings, source)
        with Pipeline.open(settings) as pipeline:
            stats, _ = pipeline.state.finished_stats("fetch")
            report_hosts = collect(pipeline)["hosts"]
    assert table.column("status").to_pylist() == ["ok"] * 4
    counts = state.counts
    assert counts["hosts"] == 2
    assert counts["host_requests"] == busy.requests + quiet.requests
    assert counts["host_throttled"] == busy.over_capacity >= 1
    assert counts["host_paused_ms"] >= 1000 * busy.over_capacity - 1
    [hosts] = [shard["hosts"] for shard in stats.values()]
    assert hosts["127.0.0.7"]["requests"] == busy.requests
    assert hosts["127.0.0.7"]["throttled"] == busy.over_capacity
    assert hosts["127.0.0.7"]["rate"] > 0 and hosts["127.0.0.8"]["throttled"] == 0
    assert report_hosts["totals"]["host_throttled"] == busy.over_capacity
    assert report_hosts["busiest"][0][0] == "127.0.0.7"


def test_shard_2_starts_from_the_rate_shard_1_learned(tmp_path, settings):
    host = Host("127.0.0.9", capacity=5)  # 429 without Retry-After above 5/s
    settings = settings.model_copy(
        update={
            "shard_size": 40,
            "fetch": settings.fetch.model_copy(update={"per_host_rate": 200, "retries": 6}),
        }
    )
    with RateSite([host], image):
        urls = [host.url(f"img{i}.png") for i in range(80)]
        source = tmp_path / "source.parquet"
        pq.write_table(pa.table({"url": urls, "caption": ["c"] * len(urls)}), source)
        with Pipeline.open(settings) as pipeline:
            first, second = pipeline.select_shards([str(source)])
            pipeline.run("fetch", first)
            after_first = HostRateStore(pipeline.state.engine).load(["127.0.0.9"])
            pipeline.run("fetch", second)
            stats, _ = pipeline.state.finished_stats("fetch")
            after_second = HostRateStore(pipeline.state.engine).load(["127.0.0.9"])
    one, two = stats[first]["hosts"]["127.0.0.9"], stats[second]["hosts"]["127.0.0.9"]
    assert one["start_rate"] == settings.fetch.host_start_rate
    assert one["throttled"] >= 1  # it pushed back, so its rate was learned
    assert after_first == {"127.0.0.9": pytest.approx(one["rate"], abs=0.001)}
    assert two["start_rate"] == pytest.approx(one["rate"], abs=0.001)
    assert after_second["127.0.0.9"] == pytest.approx(two["rate"], abs=0.001)


def run_together(processes: int, limits_json: str, urls: list[str]) -> list[dict[str, int]]:
    """`processes` fetch processes, started at once, each with its share of `urls`."""
    worker = Path(__file__).parent / "support" / "fetch_worker.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    started = [
        subprocess.Popen(
            [sys.executable, str(worker), limits_json, *urls[index::processes]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for index in range(processes)
    ]
    for process in started:
        assert process.stdout.readline().strip() == "ready"
    for process in started:
        process.stdin.write("go\n")
        process.stdin.flush()
    outcomes = []
    for process in started:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        outcomes.append(json.loads(out.strip().splitlines()[-1]))
    return outcomes


def test_two_processes_share_one_budget_per_host_in_redis():
    # 10 requests/s, no Retry-After; each process may ask it up to 8/s: alone that is within
    # its capacity, two of them at once are not, unless they share one budget
    host = Host("127.0.0.10", capacity=10)
    redis_url = "redis://127.0.0.1:6379/0"
    redis.Redis.from_url(redis_url).delete(KEY_PREFIX + "127.0.0.10")
    settings = {
        **LOOPBACK_FETCH,
        "per_host_rate": 8,
        "host_start_rate": 8,
        "retries": 0,
        "respect_robots_txt": False,
    }
    with RateSite([host], image):
        urls = [host.url(f"img{i}.png") for i in range(80)]
        apart = run_together(2, json.dumps(settings), urls)
        over_apart, requests_apart = host.over_capacity, host.requests
        host.requests = host.over_capacity = 0
        shared = {**settings, "host_budget_redis_url": redis_url}
        together = run_together(2, json.dumps(shared), urls)
        over_shared, requests_shared = host.over_capacity, host.requests
    assert requests_apart == requests_shared == 80
    assert over_apart > 0, "two processes at 8/s each stayed under 10/s without sharing"
    assert over_shared == 0
    assert [outcome.get("ok") for outcome in together] == [40, 40]
    assert sum(outcome.get("ok", 0) for outcome in apart) == 80 - over_apart


def test_a_host_the_shared_budget_holds_back_holds_back_no_other(tmp_path):
    # another process has emptied the held host's bucket in Redis (5 s of debt at 1/s):
    # its rows come first, yet the free host's rows are all fetched before the held host
    # sees a request, because a row waiting on the bucket stops its host's queue
    held = Host("127.0.0.11", capacity=0)
    free = Host("127.0.0.12", capacity=0)
    redis_url = "redis://127.0.0.1:6379/0"
    client = redis.Redis.from_url(redis_url)
    client.delete(KEY_PREFIX + "127.0.0.11", KEY_PREFIX + "127.0.0.12")
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    client.hset(
        KEY_PREFIX + "127.0.0.11", mapping={"tokens": -4, "at": now, "rate": 1, "rate_at": now}
    )
    held_when_free_done: list[int] = []
    with RateSite([held, free], image):
        urls = [held.url(f"h{i}.png") for i in range(8)] + [
            free.url(f"f{i}.png") for i in range(20)
        ]
        free_done = 0

        def on_record(record: dict[str, Any]) -> None:
            nonlocal free_done
            if "127.0.0.12" in record["url"]:
                free_done += 1
                if free_done == 20:
                    held_when_free_done.append(held.requests)

        # one connection: four workers (WORKERS_PER_CONNECTION), as many as the held host
        # may have in flight
        fetch_limits = limits(
            concurrency=1,
            per_host_concurrency=WORKERS_PER_CONNECTION,
            host_start_rate=20,
            respect_robots_txt=False,
            host_budget_redis_url=redis_url,
        )
        records = fetch(tmp_path, urls, fetch_limits, on_record)
    # without the hold every worker would have ended up asleep on the held host's bucket
    assert held_when_free_done == [0]
    assert all(r["status"] == "ok" for r in records.values())
