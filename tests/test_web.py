"""Units of the web layer, no network: address guard, robots.txt, X-Robots-Tag, host limits."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools

import pytest

from facecaption.fetch.web.consent import opt_out_directive
from facecaption.fetch.web.guard import AddressGuard
from facecaption.fetch.web.robots import RobotsTxt
from facecaption.fetch.web.throttle import HostThrottle
from facecaption.settings import FetchSettings

TOKEN = "facecaption"
DIRECTIVES = FetchSettings().opt_out_directives


# -- address guard --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "127.0.0.1",
        "0.0.0.0",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::1",
        "::",
        "::ffff:10.0.0.1",
        "2001:db8::1",
    ],
)
def test_guard_blocks_non_global_addresses_with_a_reason(address):
    reason = AddressGuard([]).blocked_reason(ipaddress.ip_address(address))
    assert isinstance(reason, str) and reason


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1"])
def test_guard_allows_global_addresses(address):
    assert AddressGuard([]).blocked_reason(ipaddress.ip_address(address)) is None


def test_guard_allow_list_opens_only_its_network():
    guard = AddressGuard(["10.0.0.0/8", "fc00::/7"])
    assert guard.blocked_reason(ipaddress.ip_address("10.1.2.3")) is None
    assert guard.blocked_reason(ipaddress.ip_address("fd12::1")) is None
    assert guard.blocked_reason(ipaddress.ip_address("192.168.1.1")) == "private"
    assert guard.blocked_reason(ipaddress.ip_address("127.0.0.1")) == "loopback"


def test_guard_judges_ipv4_mapped_ipv6_as_ipv4():
    guard = AddressGuard(["127.0.0.0/8"])
    # the IPv4 allow-list applies to the mapped form, and so do the IPv4 classes
    assert guard.blocked_reason(ipaddress.ip_address("::ffff:127.0.0.1")) is None
    assert guard.blocked_reason(ipaddress.ip_address("::ffff:10.0.0.1")) == (
        "private (IPv4 inside an IPv4-mapped address)"
    )
    assert guard.blocked_reason(ipaddress.ip_address("::ffff:169.254.169.254"))
    assert AddressGuard([]).blocked_reason(ipaddress.ip_address("::ffff:8.8.8.8")) is None


# -- robots.txt -------------------------------------------------------------------------------


def test_robots_star_group_applies_to_us():
    robots = RobotsTxt.parse("User-agent: *\nDisallow: /private/\n")
    assert not robots.allows(TOKEN, "/private/x.png")
    assert robots.allows(TOKEN, "/public/x.png")


def test_robots_group_naming_our_token_overrides_star():
    robots = RobotsTxt.parse(
        "User-agent: *\nDisallow: /\n\nUser-agent: FaceCaption\nDisallow: /secret/\n"
    )
    assert robots.allows(TOKEN, "/images/a.png")
    assert not robots.allows(TOKEN, "/secret/a.png")
    assert not robots.allows("otherbot", "/images/a.png")


def test_robots_longest_match_wins():
    robots = RobotsTxt.parse(
        "User-agent: *\nDisallow: /p/\nAllow: /p/public/\nDisallow: /p/public/hidden\n"
    )
    assert not robots.allows(TOKEN, "/p/other.png")
    assert robots.allows(TOKEN, "/p/public/a.png")
    assert not robots.allows(TOKEN, "/p/public/hidden.png")


def test_robots_allow_wins_a_tie():
    robots = RobotsTxt.parse("User-agent: *\nDisallow: /a\nAllow: /a\n")
    assert robots.allows(TOKEN, "/a/b.png")
    robots = RobotsTxt.parse("User-agent: *\nAllow: /a\nDisallow: /a\n")
    assert robots.allows(TOKEN, "/a/b.png")


def test_robots_wildcard_and_end_anchor():
    robots = RobotsTxt.parse("User-agent: *\nDisallow: /*.gif$\nDisallow: /tmp*/cache\n")
    assert not robots.allows(TOKEN, "/x/y.gif")
    assert robots.allows(TOKEN, "/x/y.gif?size=2")
    assert robots.allows(TOKEN, "/x/y.gifv")
    assert not robots.allows(TOKEN, "/tmp123/cache/a.png")
    assert robots.allows(TOKEN, "/tmp123/a.png")


def test_robots_empty_disallow_allows_all():
    robots = RobotsTxt.parse("User-agent: *\nDisallow: /\n\nUser-agent: facecaption\nDisallow:\n")
    assert robots.allows(TOKEN, "/anything.png")
    assert robots.allows(TOKEN, "/")


def test_robots_comments_are_ignored():
    robots = RobotsTxt.parse(
        "# Disallow: /everything\n"
        "User-agent: * # all of them\n"
        "Disallow: /private/ # keep out\n"
        "# Allow: /private/\n"
    )
    assert not robots.allows(TOKEN, "/private/a.png")
    assert robots.allows(TOKEN, "/everything/a.png")


def test_robots_percent_encoding_is_normalised():
    robots = RobotsTxt.parse("User-agent: *\nDisallow: /a%20b/\nDisallow: /café/\n")
    assert not robots.allows(TOKEN, "/a b/x.png")
    assert not robots.allows(TOKEN, "/a%20b/x.png")
    assert not robots.allows(TOKEN, "/caf%C3%A9/x.png")
    assert robots.allows(TOKEN, "/cafe/x.png")


# -- X-Robots-Tag -----------------------------------------------------------------------------


def test_consent_global_noai_opts_out():
    assert opt_out_directive(["noai"], TOKEN, DIRECTIVES) == "noai"


def test_consent_finds_noimageai_among_other_directives():
    assert opt_out_directive(["noimageai, nofollow"], TOKEN, DIRECTIVES) == "noimageai"
    assert opt_out_directive(["nofollow, noarchive"], TOKEN, DIRECTIVES) is None


def test_consent_directive_scoped_to_us_applies():
    assert opt_out_directive(["FaceCaption: noindex"], TOKEN, DIRECTIVES) == "facecaption: noindex"


def test_consent_directive_scoped_to_another_bot_does_not_apply():
    assert opt_out_directive(["googlebot: noai"], TOKEN, DIRECTIVES) is None
    assert opt_out_directive(["googlebot: noindex, noai"], TOKEN, DIRECTIVES) is None


def test_consent_valued_directive_is_not_a_scope():
    assert opt_out_directive(["max-image-preview: large"], TOKEN, DIRECTIVES) is None
    # were `max-image-preview` read as a bot name, the noai after it would be scoped away
    assert opt_out_directive(["max-image-preview: large, noai"], TOKEN, DIRECTIVES) == "noai"


def test_consent_reads_every_header_value_and_scopes_each_alone():
    assert opt_out_directive(["googlebot: noai", "noimageindex"], TOKEN, DIRECTIVES) == (
        "noimageindex"
    )
    assert opt_out_directive(["nofollow", "facecaption: noai"], TOKEN, DIRECTIVES) == (
        "facecaption: noai"
    )
    assert opt_out_directive(["nofollow", "otherbot: noai"], TOKEN, DIRECTIVES) is None


# -- per-host limits --------------------------------------------------------------------------


def test_host_limiter_never_lets_more_than_concurrency_in():
    async def main() -> int:
        limiter = HostThrottle(FetchSettings(per_host_concurrency=2, per_host_rate=0))
        inside = most = 0

        async def one() -> None:
            nonlocal inside, most
            async with limiter.slot("example"):
                inside += 1
                most = max(most, inside)
                await asyncio.sleep(0.02)
                inside -= 1

        await asyncio.gather(*(one() for _ in range(10)))
        return most

    assert asyncio.run(main()) == 2


def test_host_limiter_rate_spaces_starts():
    async def main() -> list[float]:
        limiter = HostThrottle(
            FetchSettings(per_host_concurrency=8, per_host_rate=20, host_start_rate=20)
        )
        loop = asyncio.get_running_loop()
        starts: list[float] = []

        async def one() -> None:
            async with limiter.slot("example"):
                starts.append(loop.time())

        await asyncio.gather(*(one() for _ in range(6)))
        return sorted(starts)

    starts = asyncio.run(main())
    assert starts[-1] - starts[0] >= 0.24
    assert all(later - earlier >= 0.04 for earlier, later in itertools.pairwise(starts))


def test_host_limiter_pause_delays_the_next_start_on_that_host_only():
    async def main() -> tuple[float, float]:
        limiter = HostThrottle(FetchSettings(per_host_concurrency=2, per_host_rate=0))
        loop = asyncio.get_running_loop()
        began = loop.time()
        limiter.pause("paused", 0.3)
        async with limiter.slot("other"):
            other = loop.time() - began
        async with limiter.slot("paused"):
            paused = loop.time() - began
        return other, paused

    other, paused = asyncio.run(main())
    assert other < 0.1
    assert paused >= 0.29


def test_robots_crawl_delay_of_our_group_or_the_star_group():
    robots = RobotsTxt.parse(
        "User-agent: *\nCrawl-delay: 2\n\nUser-agent: facecaption\nCrawl-delay: 0.5\nAllow: /\n"
    )
    assert robots.crawl_delay("facecaption") == 0.5
    assert robots.crawl_delay("otherbot") == 2.0
    assert RobotsTxt.parse("User-agent: *\nCrawl-delay: soon\n").crawl_delay("x") is None
    assert RobotsTxt.parse("User-agent: *\nCrawl-delay: -1\n").crawl_delay("x") is None
    assert RobotsTxt.parse("User-agent: *\nCrawl-delay: inf\n").crawl_delay("x") is None
