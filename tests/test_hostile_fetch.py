"""The fetch side's hostile-input battery: every kind of bad url cell, redirect, HTTP answer,
header, body and robots.txt below is served for real over loopback in one shard, between good
rows, and each must end as its row's typed status with the good rows untouched, the stage
done and a forced re-run changing nothing. Source files that are broken as a whole are
planned (or refused) beside good ones at the end.

Every request goes to loopback: the sites live in 127.0.1.0/24, the only network the fetch
settings allow, so a blocked address here is another loopback or a private one.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import re
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import LOOPBACK_FETCH, fresh_database
from support.hostile import (
    HOSTILE_NETWORK,
    Battery,
    Hostile,
    png,
    raw_answer,
    run_battery,
)
from support.samplesite import Route, SampleSite

from facecaption.cli import main
from facecaption.core.pipeline import Pipeline
from facecaption.core.status import format_status
from facecaption.fetch.web.downloader import Downloader, retry_later
from facecaption.fetch.web.guard import AddressGuard, GuardedResolver
from facecaption.fetch.web.robots import MAX_RECORDS, RobotsTxt
from facecaption.settings import FetchSettings, Settings

PNG_OK = png(250, size=20)  # served by the hostile kinds that must still end ok


def redirect_to(location: str) -> Route:
    return Route(status=302, headers={"Location": location})


def raw_redirect(location: bytes) -> Route:
    return Route(raw=raw_answer(b"302 Found", [(b"Location", location)]))


def robots_site(name: str, robots: Route, expected: str, shade: int, **extra) -> Hostile:
    """A kind on its own host, whose robots.txt is the hostile part."""
    return Hostile(
        name,
        expected,
        route=Route(png(shade, size=18), "image/png"),
        site=name,
        site_routes={"robots.txt": robots},
        **extra,
    )


CATASTROPHIC_PATTERN = b"User-agent: *\nDisallow: /" + b"*a" * 40 + b"*b$\n"


def many_rules(agents: int, rules: int) -> bytes:
    """A robots.txt of one group naming `agents` user-agents (ours among them), with `rules`
    disallow lines that do not match the kinds' paths."""
    names = [f"bot{n}" for n in range(agents - 1)] + ["facecaption"]
    lines = [f"User-agent: {name}" for name in names] + [f"Disallow: /r{n}/" for n in range(rules)]
    return "\n".join(lines).encode() + b"\n"


URL_CELLS = [
    Hostile("url: null", "invalid_url", url=None, error="empty url"),
    Hostile("url: empty text", "invalid_url", url=""),
    Hostile("url: only whitespace", "invalid_url", url=" \t  "),
    Hostile("url: NUL byte", "invalid_url", url="http://example.com/a\x00b.png", error="\\x00"),
    Hostile("url: newline inside", "invalid_url", url="http://example.com/a\nb.png"),
    Hostile(
        "url: bytes that are not UTF-8",
        "invalid_url",
        url=b"http://example.com/\xff\xfe.png",
        error="UTF-8",
    ),
    Hostile(
        "url: truncated UTF-8 sequence",
        "invalid_url",
        url=b"http://example.com/caf\xc3.png",
        error="UTF-8",
    ),
    Hostile("host: bad punycode xn--a", "invalid_url", url="http://xn--a.com/x.png"),
    Hostile("host: empty label a..b", "invalid_url", url="http://a..b/x.png", error="empty label"),
    Hostile("host: 64-character label", "invalid_url", url=f"http://{'a' * 64}.com/x.png"),
    Hostile("host: over 253 characters", "invalid_url", url=f"http://{'abcdefghi.' * 26}com/"),
    Hostile("host: a space", "invalid_url", url="http://exa mple.com/x.png"),
    Hostile("host: percent-encoded NUL", "invalid_url", url="http://a%00b.com/x.png"),
    Hostile("host: soft hyphen idna refuses", "invalid_url", url="http://a\u00ad.com/x.png"),
    Hostile("host: decimal ipv4", "invalid_url", url="http://2130706433/x.png", error="numeric"),
    Hostile("host: hex ipv4", "invalid_url", url="http://0x7f.0.0.1/x.png"),
    Hostile("host: none", "invalid_url", url="http:///x.png", error="no host"),
    Hostile("url: only userinfo http://@/", "invalid_url", url="http://@/"),
    Hostile("ipv6: unclosed bracket", "invalid_url", url="http://[::1/x.png"),
    Hostile("port: 99999", "invalid_url", url="http://example.com:99999/x.png"),
    Hostile("port: 0", "invalid_url", url="http://example.com:0/x.png", error="port 0"),
    Hostile("scheme: javascript", "invalid_url", url="javascript:alert(1)", error="scheme"),
    Hostile("scheme: data url", "invalid_url", url="data:image/png;base64,iVBORw0KGgo="),
    Hostile("url: relative path", "invalid_url", url="images/x.png"),
    Hostile(
        "url: user and password",
        "invalid_url",
        url="http://fc:hunter2@example.com/x.png",
        error="carries credentials: 'http://fc:***@example.com/x.png'",
    ),
    Hostile(
        "url: a user alone, maybe a token",
        "invalid_url",
        url="http://ghp_t0ken@example.com/x.png",
        error="'http://***@example.com/x.png'",
    ),
]

SSRF = [
    Hostile("ssrf: loopback outside the allow-list", "blocked_address", url="http://127.0.0.1:9/"),
    Hostile(
        "ssrf: 6to4 carrying 127.0.0.1",
        "blocked_address",
        url="http://[2002:7f00:1::]:9/x.png",
        error="host is a loopback address (IPv4 inside a 6to4 address)",
    ),
    Hostile(
        "ssrf: NAT64 carrying 10.0.0.1",
        "blocked_address",
        url="http://[64:ff9b::a00:1]:9/x.png",
        error="a private address (IPv4 inside a NAT64 address)",
    ),
    Hostile(
        "ssrf: local NAT64 carrying 127.0.0.1",
        "blocked_address",
        url="http://[64:ff9b:1::7f00:1]:9/x.png",
    ),
    Hostile(
        "ssrf: Teredo with a loopback client",
        "blocked_address",
        url="http://[2001:0:4136:e378:8000:63bf:80ff:fffe]:9/x.png",
        error="a loopback address (IPv4 inside a Teredo address)",
    ),
    Hostile("ssrf: IPv4-mapped private", "blocked_address", url="http://[::ffff:192.168.0.1]/"),
    Hostile(
        "ssrf: a name resolving to loopback",
        "blocked_address",
        url="http://localhost:9/x.png",
        error="localhost resolves to a loopback address",
    ),
    Hostile(
        "ssrf: the cloud metadata address",
        "blocked_address",
        url="http://169.254.169.254/latest/meta-data/",
        error="host is a link-local address",
    ),
]

REDIRECTS = [
    Hostile(
        "location: unclosed IPv6 bracket", "invalid_redirect", route=redirect_to("http://[::1/x")
    ),
    Hostile(
        "location: port 99999", "invalid_redirect", route=redirect_to("http://127.0.1.1:99999/")
    ),
    Hostile("location: port 0", "invalid_redirect", route=redirect_to("http://127.0.1.1:0/")),
    Hostile(
        "location: empty", "invalid_redirect", route=redirect_to(""), error="without a Location"
    ),
    Hostile("location: only spaces", "invalid_redirect", route=raw_redirect(b"   ")),
    Hostile(
        "location: missing",
        "invalid_redirect",
        route=Route(raw=raw_answer(b"302 Found")),
        error="without a Location",
    ),
    Hostile(
        "location: raw 0xff bytes",
        "invalid_redirect",
        route=raw_redirect(b"/\xff\xfe.png"),
        error="UTF-8",
    ),
    Hostile(
        "location: raw bytes in the host",
        "invalid_redirect",
        route=raw_redirect(b"http://\xff.com/"),
    ),
    Hostile("location: http://@/", "invalid_redirect", route=redirect_to("http://@/")),
    Hostile(
        "location: user and password",
        "invalid_redirect",
        route=redirect_to("http://fc:hunter2@127.0.1.1/good/0.png"),
        error="'http://fc:***@127.0.1.1/good/0.png'",
    ),
    Hostile(
        "location: bad punycode host", "invalid_redirect", route=redirect_to("http://xn--a.com/")
    ),
    Hostile("location: protocol-relative a..b", "invalid_redirect", route=redirect_to("//a..b/x")),
    Hostile(
        "location: decimal ipv4 host", "invalid_redirect", route=redirect_to("http://2130706433/")
    ),
    Hostile("location: javascript", "invalid_redirect", route=redirect_to("javascript:alert(1)")),
    Hostile("location: ftp", "invalid_redirect", route=redirect_to("ftp://127.0.1.1/x.png")),
    Hostile(
        "location: 60 KB value",
        "invalid_redirect",
        route=raw_redirect(b"/" + b"a" * 60_000),
        error="Location of 60001 characters, over 8190",
    ),
    Hostile(
        "location: 9 KB value",
        "invalid_redirect",
        route=redirect_to("/" + "a" * 9_000),
        error="over 8190",
    ),
    Hostile(
        "location: over the 64 KiB header line limit",
        "invalid_response",
        route=raw_redirect(b"/" + b"a" * 70_000),
        error="Got more than 65536 bytes",
    ),
    Hostile("location: NUL byte", "invalid_response", route=raw_redirect(b"/a\x00b.png")),
    Hostile(
        "location: encoded NUL in the path",
        "http_error",
        route=redirect_to("/a%00b.png"),
        error="Not Found",
    ),
    Hostile(
        "location: IPv6 loopback", "blocked_address", route=redirect_to("http://[::1]:9/x.png")
    ),
    Hostile(
        "location: 6to4 private", "blocked_address", route=redirect_to("http://[2002:a00:1::]/")
    ),
    Hostile(
        "location: a loop",
        "http_error",
        route=redirect_to("/hostile/location-a-loop.png"),
        error="redirects",
    ),
]

ANSWERS = [
    Hostile("answer: not HTTP", "invalid_response", route=Route(raw=b"hello there\r\n\r\n")),
    Hostile("answer: image bytes, no status line", "invalid_response", route=Route(raw=PNG_OK)),
    Hostile(
        "answer: status code 2000",
        "invalid_response",
        route=Route(raw=b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"),
    ),
    Hostile(
        "answer: status code 999",
        "http_error",
        route=Route(raw=b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n"),
    ),
    Hostile("answer: hang up without a word", "connection_error", route=Route(raw=b"")),
    Hostile(
        "answer: 404 without a reason phrase",
        "http_error",
        route=Route(raw=b"HTTP/1.1 404 \r\nContent-Length: 0\r\n\r\n"),
        error="HTTP 404",
    ),
    Hostile(
        "header: line without a colon",
        "invalid_response",
        route=Route(raw=b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 2\r\n\r\nxx"),
    ),
    Hostile(
        "header: 20000 lines",
        "invalid_response",
        route=Route(
            raw=b"HTTP/1.1 200 OK\r\n"
            + b"".join(b"X-%d: y\r\n" % i for i in range(20_000))
            + b"Content-Length: 2\r\n\r\nxx"
        ),
    ),
    Hostile(
        "header: content-length not a number",
        "invalid_response",
        route=Route(raw=b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nxx"),
    ),
    Hostile(
        "header: negative content-length",
        "invalid_response",
        route=Route(raw=b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nxx"),
    ),
    Hostile(
        "header: two content-lengths",
        "invalid_response",
        route=Route(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nxxx"),
    ),
    Hostile(
        "header: content-length 10^26",
        "invalid_response",
        route=Route(raw=b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 26 + b"\r\n\r\nxx"),
    ),
    Hostile(
        "header: content-length over max_bytes",
        "too_large",
        route=Route(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\nxx"),
        error="Content-Length",
    ),
    Hostile(
        "header: retry-after a superscript digit",
        "http_error",
        route=Route(raw=raw_answer(b"429 Slow Down", [(b"Retry-After", "²".encode())])),
    ),
    Hostile(
        "header: retry-after in the year 9999",
        "http_error",
        route=Route(
            raw=raw_answer(b"503 Busy", [(b"Retry-After", b"Fri, 31 Dec 9999 23:59:59 GMT")])
        ),
        site="busy-until-9999",  # the host is paused (up to retry_after_max_s): alone there
    ),
    Hostile(
        "header: x-robots-tag raw bytes then noai",
        "opted_out",
        route=Route(raw=raw_answer(headers=[(b"X-Robots-Tag", b"\xff\xfe, noai")], body=PNG_OK)),
    ),
    Hostile(
        "body: chunk size not hex",
        "invalid_response",
        route=Route(
            raw=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"
        ),
    ),
    Hostile(
        "body: shorter than content-length",
        "connection_error",
        route=Route(PNG_OK, "image/png", declared_length=len(PNG_OK) + 100),
    ),
    Hostile(
        "body: gzip bomb",
        "too_large",
        route=Route(
            raw=raw_answer(
                headers=[(b"Content-Encoding", b"gzip")], body=gzip.compress(b"\0" * 8_000_000)
            )
        ),
        error="body exceeds",
    ),
    Hostile(
        "body: corrupt gzip",
        "connection_error",
        route=Route(
            raw=raw_answer(headers=[(b"Content-Encoding", b"gzip")], body=b"\x1f\x8b" * 50)
        ),
    ),
    Hostile("body: html as image/png", "not_an_image", route=Route(b"<html></html>", "image/png")),
    Hostile("body: empty", "not_an_image", route=Route(b"", "image/png")),
    Hostile("body: png cut short", "decode_error", route=Route(png(7, size=64)[:60], "image/png")),
]

ROBOTS = [
    robots_site("robots: redirect to http://@/", redirect_to("http://@/"), "invalid_redirect", 201),
    robots_site(
        "robots: redirect with raw bytes",
        raw_redirect(b"/\xffrobots.txt"),
        "invalid_redirect",
        202,
        error="robots.txt",
    ),
    robots_site(
        "robots: not HTTP",
        Route(raw=b"nonsense\r\n\r\n"),
        "invalid_response",
        203,
        error="robots.txt",
    ),
    robots_site("robots: binary garbage", Route(bytes(range(256)) * 40), "ok", 204),
    robots_site(
        "robots: NUL bytes and a 100 KB line",
        Route(b"User-agent: *\x00\nDisallow: /" + b"x" * 100_000 + b"\n"),
        "ok",
        205,
    ),
    robots_site("robots: redirect loop", redirect_to("/robots.txt"), "ok", 206),
    Hostile(
        "robots: pattern that backtracks",
        "ok",
        route=Route(png(207, size=18), "image/png"),
        site="robots-backtracking",
        site_routes={"robots.txt": Route(CATASTROPHIC_PATTERN, "text/plain")},
        path=f"{'a' * 300}.png",
    ),
    robots_site("robots: server error", Route(b"down", status=500), "robots_unavailable", 208),
    robots_site(
        "robots: over 10000 rules",
        Route(many_rules(1, 12_000), "text/plain"),
        "robots_disallowed",
        209,
        error="robots.txt has over 10000 rules and user-agent lines",
    ),
    robots_site(
        "robots: 1000 agents sharing 9000 rules",  # each agent's own copy: 9 million rules
        Route(many_rules(1000, 9000), "text/plain"),
        "ok",
        210,
    ),
    robots_site(
        "robots: its disallow past 500 KiB",  # not read, as RFC 9309 allows and Google does
        Route(b"# filler\n" * 60_000 + b"User-agent: *\nDisallow: /\n", "text/plain"),
        "ok",
        211,
    ),
]

KINDS = URL_CELLS + SSRF + REDIRECTS + ANSWERS + ROBOTS


def hostile_settings(root: Path, db_url: str) -> Settings:
    return Settings(
        home=root / "home",
        db_url=db_url,
        store_root=str(root / "artifacts"),
        fetch={
            **LOOPBACK_FETCH,
            "allow_networks": [HOSTILE_NETWORK],
            "retries": 1,
            "max_bytes": 2_000_000,
        },
    )


@pytest.fixture(scope="module")
def battery(tmp_path_factory, pg_admin_url, template_db) -> Iterator[Battery]:
    root = tmp_path_factory.mktemp("hostile")
    with (
        fresh_database(pg_admin_url, template_db) as db_url,
        fresh_database(pg_admin_url, template_db) as baseline_db_url,
    ):
        yield run_battery(
            KINDS,
            hostile_settings(root / "hostile", db_url),
            hostile_settings(root / "baseline", baseline_db_url),
            ["fetch"],
            root,
        )


def test_battery_has_many_distinct_kinds():
    assert len({kind.slug for kind in KINDS}) == len(KINDS) >= 35


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.slug)
def test_bad_input_is_its_rows_typed_status(battery, kind):
    rows = battery.first.fetch_rows()
    row = rows[kind.sample_id]
    # (a) the typed status, with a reason
    assert row["status"] == kind.expected, row["error"]
    if kind.expected != "ok":
        assert row["error"]
    if kind.error:
        assert kind.error in row["error"]
    # (b) the good rows either side are what a run without any bad row gives
    baseline = battery.baseline.fetch_rows()
    for good in battery.neighbours(kind):
        assert comparable(rows[good]) == comparable(baseline[good]), good
    # (c) the stage is done
    assert battery.first.states["fetch"].status == "done", battery.first.states["fetch"]
    # (d) a forced re-run changes nothing
    assert battery.again.fetch_rows()[kind.sample_id] == row


def comparable(row: dict) -> dict:
    """A fetch row without what depends on its place in the shard."""
    return {k: v for k, v in row.items() if k not in ("key", "row", "duplicate_of")}


def test_good_rows_match_a_run_without_the_bad_ones(battery):
    rows, baseline = battery.first.fetch_rows(), battery.baseline.fetch_rows()
    assert len(battery.good_ids) == len(KINDS) + 1
    for good in battery.good_ids:
        assert rows[good]["status"] == "ok"
        assert comparable(rows[good]) == comparable(baseline[good]), good


def test_forced_rerun_gives_the_same_artifacts(battery):
    first, again = battery.first.states["fetch"], battery.again.states["fetch"]
    assert again.status == "done"
    assert battery.again.checksums() == battery.first.checksums()
    transient = sum(
        retry_later(row["status"], row["http_status"])
        for row in battery.first.fetch_rows().values()
    )
    # the first run reused nothing; the forced one fetched only the transient rows again,
    # and checked every url cell again rather than reusing its verdict
    assert first.counts["reused"] == 0
    assert again.counts["fetched"] == transient
    assert (
        again.counts["reused"] + again.counts["fetched"] + again.counts["invalid_url"]
        == (again.counts["rows"])
    )


def test_blocked_address_errors_name_the_class_never_the_internal_address(battery):
    """A row's error is stored and published: it says which class of address was refused
    (loopback, private, link-local...), never the address a name resolved to or an IPv6
    address carried."""
    rows = battery.first.fetch_rows()
    blocked = [kind for kind in KINDS if kind.expected == "blocked_address"]
    assert len(blocked) >= 8
    for kind in blocked:
        error = rows[kind.sample_id]["error"]
        assert re.search(r"\ban? [a-z-]+ address\b", error), error
        assert not re.search(r"\d+\.\d+\.\d+\.\d+|[0-9a-f]*::", error), error


def test_stage_counts_and_status_show_the_new_statuses(battery):
    counts = battery.first.states["fetch"].counts
    for status in ("invalid_url", "invalid_redirect", "invalid_response", "blocked_address"):
        expected = sum(kind.expected == status for kind in KINDS)
        assert counts[status] == expected, status
    with Pipeline.open(battery.first.settings) as pipeline:
        table = format_status(pipeline.status())
    assert "invalid_redirect" in table and "invalid_response" in table


@pytest.mark.parametrize(
    ("status", "http_status", "retried"),
    [
        ("invalid_url", None, False),
        ("invalid_redirect", 302, False),
        ("invalid_response", None, False),
        ("source_error", None, False),
        ("blocked_address", None, False),
        ("connection_error", None, True),
        ("robots_unavailable", 500, True),
        ("http_error", 429, True),
        ("http_error", 999, False),
    ],
)
def test_retry_later_knows_which_statuses_are_transient(status, http_status, retried):
    assert retry_later(status, http_status) is retried


# -- the downloader on its own: any object, no exception --------------------------------------


@pytest.mark.parametrize(
    "cell",
    [123, 4.5, True, ["http://example.com/x.png"], {"url": "x"}, b"http://example.com/x.png"],
    ids=["int", "float", "bool", "list", "dict", "bytes"],
)
def test_download_of_a_cell_that_is_not_text_is_invalid_url(cell):
    import asyncio

    async def get():
        async with Downloader(FetchSettings(**LOOPBACK_FETCH)) as downloader:
            return await downloader.get(cell)

    result = asyncio.run(get())
    assert result.status == "invalid_url"
    assert type(cell).__name__ in result.error


def test_guarded_resolver_judges_dns_answers_by_the_ipv4_they_carry():
    """DNS answers are checked like literal hosts: a name answering with a 6to4, NAT64 or
    Teredo address that carries a loopback or private IPv4 is refused whole."""
    import asyncio
    import socket

    from aiohttp.abc import AbstractResolver

    class Answers(AbstractResolver):
        """A name server's answers, as aiohttp's resolvers return them."""

        def __init__(self, answers: dict[str, list[str]]) -> None:
            self.answers = answers

        async def resolve(self, host, port=0, family=socket.AF_INET):
            return [
                {"hostname": host, "host": address, "port": port, "family": socket.AF_INET6,
                 "proto": 0, "flags": 0}
                for address in self.answers[host]
            ]  # fmt: skip

        async def close(self) -> None:
            pass

    answers = {
        "sixtofour.test": ["2606:4700::1", "2002:7f00:1::"],
        "nat64.test": ["64:ff9b::a9fe:a9fe"],  # the cloud metadata address
        "teredo.test": ["2001:0:4136:e378:8000:63bf:f5ff:fffe"],  # client 10.0.0.1
        "public.test": ["2002:808:808::", "64:ff9b::808:808"],
    }

    async def resolve_all():
        resolver = GuardedResolver(AddressGuard([]), inner=Answers(answers))
        outcomes = {}
        for host in answers:
            try:
                await resolver.resolve(host, 80, socket.AF_UNSPEC)
                outcomes[host] = None
            except OSError as error:
                outcomes[host] = str(error)
        return outcomes

    outcomes = asyncio.run(resolve_all())
    assert outcomes["sixtofour.test"] == (
        "sixtofour.test resolves to a loopback address (IPv4 inside a 6to4 address)"
    )
    assert "a link-local address (IPv4 inside a NAT64 address)" in outcomes["nat64.test"]
    assert "a private address (IPv4 inside a Teredo address)" in outcomes["teredo.test"]
    assert outcomes["public.test"] is None


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("2002:808:808::", False),  # 6to4 of a public IPv4
        ("64:ff9b::808:808", False),  # NAT64 of a public IPv4
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", False),  # Teredo, public server and client
        ("64:ff9b:1::808:808", True),  # local-use NAT64: never global
        ("2002:c0a8:1::", True),  # 6to4 of 192.168.0.1
        ("::ffff:169.254.169.254", True),
    ],
)
def test_guard_judges_ipv6_by_the_ipv4_it_carries(address, blocked):
    reason = AddressGuard([]).blocked_reason(ipaddress.ip_address(address))
    assert (reason is not None) is blocked, reason


@pytest.mark.parametrize(("agents", "rules"), [(5000, 40_000), (1, 9_999), (1000, 9000)])
def test_a_500_kib_robots_txt_parses_in_bounded_memory(agents, rules):
    """Any robots.txt the download keeps (500 KiB) parses into a few MB: agents share their
    group's rules (5000 agents x 40000 rules used to be 200 million Rule objects), and past
    MAX_RECORDS rules and agents the file is read as disallowing everything."""
    text = many_rules(agents, rules)[:512_000].decode()
    tracemalloc.start()
    robots = RobotsTxt.parse(text)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20_000_000, peak
    over = agents + rules > MAX_RECORDS
    assert (robots.refusal is not None) is over
    assert robots.allows("facecaption", "/x.png") is not over
    assert robots.allows("facecaption", "/r7/x.png") is False


def test_robots_pattern_that_would_backtrack_matches_in_linear_time():
    robots = RobotsTxt.parse(CATASTROPHIC_PATTERN.decode())
    assert robots.allows("facecaption", "/" + "a" * 5000)  # no final b: no match
    assert not robots.allows("facecaption", "/" + "a" * 5000 + "b")


def test_credentials_in_urls_are_never_sent_nor_stored(tmp_path, settings):
    """A url cell or a redirect carrying credentials is refused before anything is sent; the
    url and error stored for the row show them masked, in fetch.parquet and fetch.tar alike,
    and the good rows around it are fetched. A forced re-run changes nothing."""
    with SampleSite({f"{n}.png": Route(png(60 + n), "image/png") for n in range(4)}) as site:
        with_password = site.url("1.png").replace("http://", "http://fc:hunter2@")
        site.routes["hop.png"] = redirect_to(with_password)
        cells = [
            site.url("0.png"),
            with_password,
            site.url("hop.png"),
            site.url("2.png").replace("http://", "http://ghp_t0ken@"),
            site.url("3.png"),
        ]
        source = write(tmp_path / "creds.parquet", pa.table({"url": cells}))
        with Pipeline.open(settings) as pipeline:
            [shard_id] = pipeline.select_shards([str(source)])
            runs = []
            for force in (False, True):
                pipeline.run("fetch", shard_id, force=force)
                state = pipeline.state.get_stage(shard_id, "fetch")
                runs.append(pq.read_table(state.artifacts["fetch.parquet"]["uri"]).to_pylist())
                stored = Path(state.artifacts["fetch.parquet"]["uri"]).read_bytes()
                stored += Path(state.artifacts["fetch.tar"]["uri"]).read_bytes()
                assert b"hunter2" not in stored and b"ghp_t0ken" not in stored
        assert site.hits.get("1.png") is None and site.hits.get("2.png") is None
    rows = runs[0]
    assert [r["status"] for r in rows] == [
        "ok",
        "invalid_url",
        "invalid_redirect",
        "invalid_url",
        "ok",
    ]
    masked = with_password.replace("hunter2", "***")
    assert rows[1]["url"] == masked and masked in rows[1]["error"]
    assert masked in rows[2]["error"]
    assert rows[3]["url"].startswith("http://***@127.0.0.1:")
    assert runs[1] == rows


# -- source files broken as a whole, beside good ones -----------------------------------------


def write(path: Path, table: pa.Table, **options) -> Path:
    pq.write_table(table, path, **options)
    return path


def good_table(site: SampleSite, names: list[str], url: str = "url", caption: str = "caption"):
    return pa.table({url: [site.url(n) for n in names], caption: [f"c {n}" for n in names]})


def corrupt_middle_row_group(path: Path) -> None:
    """Overwrite the url column's pages of the second row group with 0xff."""
    metadata = pq.ParquetFile(path).metadata
    column = metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))


@pytest.fixture
def cli_env(settings_env, monkeypatch):
    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)


def test_folder_of_good_and_broken_files_runs_the_good_ones(tmp_path, cli_env, settings, capsys):
    images = {f"img{i}.png": Route(png(40 + i), "image/png") for i in range(12)}
    folder = tmp_path / "source"
    folder.mkdir()
    with SampleSite(images) as site:
        good = write(folder / "a-good.parquet", good_table(site, ["img0.png", "img1.png"]))
        other_schema = write(
            folder / "b-other-schema.parquet",
            good_table(site, ["img2.png"], url="URL", caption="TEXT").append_column(
                "extra", pa.array([[1, 2]])
            ),
        )
        corrupt = write(
            folder / "c-corrupt-row-group.parquet",
            good_table(site, [f"img{i}.png" for i in range(3, 9)]),
            row_group_size=2,
        )
        corrupt_middle_row_group(corrupt)
        odd_cells = write(
            folder / "d-odd-caption-and-id-cells.parquet",
            pa.table(
                {
                    "url": [site.url("img9.png"), site.url("img10.png")],
                    "caption": pa.array([[1, 2], None]),
                    "id": pa.array([b"\xff\xfeid", b"plain"]),
                }
            ),
        )
        empty = write(folder / "e-zero-rows.parquet", pa.table({"url": pa.array([], pa.string())}))
        broken = {
            "not-parquet.parquet": "not a readable parquet file",
            "truncated.parquet": "not a readable parquet file",
            "no-url-column.parquet": "no url column",
            "url-int.parquet": "holds int64, not text",
            "url-list.parquet": "not text",
            "url-binary.parquet": "holds binary, not text",
            "url-null-type.parquet": "null in all 2 rows",
            "url-all-null.parquet": "null in all 2 rows",
            "a-folder.parquet": "not a file",
        }
        (folder / "not-parquet.parquet").write_bytes(b"PAR1 this is not parquet")
        whole = (folder / "a-good.parquet").read_bytes()
        (folder / "truncated.parquet").write_bytes(whole[: len(whole) // 2])
        write(folder / "no-url-column.parquet", pa.table({"link": ["x"]}))
        write(folder / "url-int.parquet", pa.table({"url": [1, 2]}))
        write(folder / "url-list.parquet", pa.table({"url": [["http://x/"], []]}))
        write(folder / "url-binary.parquet", pa.table({"url": [b"http://x/", b"y"]}))
        write(folder / "url-null-type.parquet", pa.table({"url": pa.nulls(2)}))
        write(
            folder / "url-all-null.parquet", pa.table({"url": pa.array([None, None], pa.string())})
        )
        (folder / "a-folder.parquet").mkdir()

        assert main(["plan", str(folder)]) == 1
        out, err = capsys.readouterr()
        for name, reason in broken.items():
            line = next((line for line in err.splitlines() if name in line), "")
            assert reason in line, (name, err)
        for planned in (good, other_schema, corrupt, odd_cells, empty):
            assert planned.name in out

        assert main(["run", "--stage", "fetch", "--source", str(folder / "*.parquet")]) == 1
        out, err = capsys.readouterr()
        assert "not all chosen work was done" in err
        assert all(name in err for name in broken)
        assert out.count("fetch: done") == 4

        with Pipeline.open(settings) as pipeline:
            rows = {}  # by source file name: fetch.parquet rows
            for source in (good, other_schema, corrupt, odd_cells):
                [shard_id] = pipeline.select_shards([str(source)])
                state = pipeline.state.get_stage(shard_id, "fetch")
                assert state.status == "done"
                rows[source.name] = pq.read_table(
                    state.artifacts["fetch.parquet"]["uri"]
                ).to_pylist()
            artifacts = {
                shard.shard_id: pipeline.state.get_stage(shard.shard_id, "fetch").artifacts
                for shard in pipeline.state.list_shards()
            }

        assert [r["status"] for r in rows[good.name]] == ["ok", "ok"]
        assert [r["status"] for r in rows[other_schema.name]] == ["ok"]
        # the second row group (rows 2 and 3) could not be read; the rows around it could
        statuses = [r["status"] for r in rows[corrupt.name]]
        assert statuses == ["ok", "ok", "source_error", "source_error", "ok", "ok"]
        assert all("row group 1" in r["error"] for r in rows[corrupt.name][2:4])
        odd = rows[odd_cells.name]
        assert [r["status"] for r in odd] == ["ok", "ok"]
        assert odd[0]["caption"] == "[1, 2]" and odd[1]["caption"] is None
        assert odd[0]["sample_id"] == "\ufffd\ufffdid" and odd[1]["sample_id"] == "plain"

        # a re-run does nothing new: the same shards, the same artifacts
        assert main(["run", "--stage", "fetch", "--source", str(folder / "*.parquet")]) == 1
        assert capsys.readouterr().out.count("fetch: skipped") == 4
        with Pipeline.open(settings) as pipeline:
            again = {
                shard.shard_id: pipeline.state.get_stage(shard.shard_id, "fetch").artifacts
                for shard in pipeline.state.list_shards()
            }
        assert again == artifacts

        assert main(["status", "--json"]) == 0
        totals = json.loads(capsys.readouterr().out)["totals"]["fetch"]
        assert totals["counts"]["source_error"] == 2
        assert totals["shards"] == {"done": 4}


def test_select_work_reports_plan_errors_beside_the_planned_shards(tmp_path, settings):
    good = write(tmp_path / "good.parquet", pa.table({"url": ["http://example.com/x.png"]}))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"nope")
    with Pipeline.open(settings) as pipeline:
        selection = pipeline.select_work([str(good), str(bad)])
        [planned] = pipeline.plan([str(good)]).shard_ids
    assert selection.shard_ids == [planned]
    assert list(selection.plan_errors) == [str(bad)]
    assert "not a readable parquet file" in selection.plan_errors[str(bad)]


@pytest.mark.slow
def test_build_dag_plans_the_good_files_and_reports_the_broken_ones(
    tmp_path, settings, settings_env, airflow_db, monkeypatch
):
    """The plan task does not fail for a broken file: the good file's shard runs, and the
    broken one is in the plan task's XCom (`plan_errors`) for the end of the run to report."""
    from airflow.dag_processing.dagbag import DagBag
    from conftest import REPO

    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)
    with SampleSite({"a.png": Route(png(90), "image/png")}) as site:
        good = write(tmp_path / "good.parquet", good_table(site, ["a.png"]))
        broken = tmp_path / "broken.parquet"
        broken.write_bytes(b"PAR1 not parquet")
        dag = DagBag(dag_folder=str(REPO / "dags")).get_dag("facecaption_build")
        run = dag.test(
            run_conf={"source": [str(good), str(broken)], "stages": ["fetch"], "publish": False}
        )
    plan = next(ti for ti in run.get_task_instances() if ti.task_id == "plan")
    assert plan.state == "success"
    plan_errors = plan.xcom_pull(task_ids="plan", key="plan_errors")
    assert list(plan_errors) == [str(broken)]
    assert "not a readable parquet file" in plan_errors[str(broken)]
    with Pipeline.open(settings) as pipeline:
        [shard_id] = pipeline.select_shards([str(good)])
        fetch = pipeline.state.get_stage(shard_id, "fetch")
    assert fetch.status == "done" and fetch.counts["ok"] == 1
