"""Which network addresses a download may reach (SSRF protection), and a caching resolver
that enforces it on the addresses actually connected to.

Loopback, private, link-local (169.254.0.0/16 with the cloud metadata address, fe80::/10),
multicast, reserved, unspecified and every other non-global address, IPv4 or IPv6, are refused
unless an explicit allow-list names their network. An IPv6 address that carries an IPv4 one
is judged by the IPv4 it carries, since that is where its packets end up: IPv4-mapped
(::ffff:0:0/96), 6to4 (2002::/16), NAT64 (64:ff9b::/96) and Teredo (2001::/32, both its server
and its client). The local-use NAT64 prefix (64:ff9b:1::/48, RFC 8215) is refused whatever it
carries: it only routes inside its operator's network.
The resolver answers each host once per downloader (one shard) and refuses blocked answers
itself, so the connector can only ever connect to addresses that passed the check.

A refusal names the class of the address (`a loopback address`, `a private address (IPv4
inside a 6to4 address)`), never the address: row errors are stored and published, and an
internal name's internal address is a map of someone's network. The address itself is
logged at debug level.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")

log = logging.getLogger(__name__)


class BlockedAddressError(OSError):
    """The host is, or resolves to, an address downloads may not reach."""


class AddressGuard:
    def __init__(self, allow_networks: list[str]) -> None:
        self.allowed = [ipaddress.ip_network(net, strict=False) for net in allow_networks]

    def blocked_reason(self, address: IPAddress) -> str | None:
        """Why `address` is refused, or None when it may be reached."""
        if any(address in network for network in self.allowed):
            return None
        carried = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else []
        for v4 in carried:
            reason = self.blocked_reason(v4)
            if reason:
                return f"{reason} (IPv4 inside {_carrier(address)})"
        if address in LOCAL_NAT64:
            return "non-global (local-use NAT64 prefix)"
        if carried:
            return None  # a public IPv4 behind a translation or tunnel prefix
        # the narrowest class first: 169.254.169.254 and :: are private too
        for reason in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
            if getattr(address, f"is_{reason}"):
                return reason.replace("_", "-")
        if not address.is_global:
            return "non-global"
        return None


def describe_blocked(reason: str) -> str:
    """A `blocked_reason` as an address class: `a loopback address`, `an unspecified
    address`, `a private address (IPv4 inside a 6to4 address)`."""
    head, paren, tail = reason.partition(" (")
    article = "an" if head[0] in "aeiou" else "a"
    return f"{article} {head} address" + (f" ({tail}" if paren else "")


def _carrier(address: ipaddress.IPv6Address) -> str:
    """What kind of IPv6 address carries an IPv4 one (see `embedded_ipv4`)."""
    if address.ipv4_mapped is not None:
        return "an IPv4-mapped address"
    if address.sixtofour is not None:
        return "a 6to4 address"
    if address.teredo is not None:
        return "a Teredo address"
    return "a NAT64 address"


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries to: IPv4-mapped, 6to4, Teredo (server and
    client), NAT64 (the low 32 bits, where the /96 prefixes put it)."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)
    if address in NAT64 or address in LOCAL_NAT64:
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def literal_address(host: str) -> IPAddress | None:
    """The address an IP-literal host names (`[::1]` included); None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class GuardedResolver(AbstractResolver):
    """Resolves each (host, port, family) once, failures included, and refuses blocked answers."""

    def __init__(self, guard: AddressGuard, inner: AbstractResolver | None = None) -> None:
        self.guard = guard
        self._inner = inner or ThreadedResolver()
        self._answers: dict[tuple[str, int, int], asyncio.Future[list[ResolveResult]]] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        key = (host, port, int(family))
        if key not in self._answers:
            self._answers[key] = asyncio.ensure_future(self._resolve_checked(host, port, family))
        return await asyncio.shield(self._answers[key])

    async def _resolve_checked(
        self, host: str, port: int, family: socket.AddressFamily
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        for answer in answers:
            reason = self.guard.blocked_reason(ipaddress.ip_address(answer["host"]))
            if reason:
                # One blocked answer refuses the host: a name that mixes public and internal
                # addresses is how DNS-rebinding attacks start.
                log.debug("%s resolves to %s: %s", host, answer["host"], reason)
                raise BlockedAddressError(f"{host} resolves to {describe_blocked(reason)}")
        return answers

    async def close(self) -> None:
        await self._inner.close()
