"""Which network addresses a download may reach (SSRF protection), and a caching resolver
that enforces it on the addresses actually connected to.

Loopback, private, link-local (169.254.0.0/16 with the cloud metadata address, fe80::/10),
multicast, reserved, unspecified and every other non-global address, IPv4 or IPv6
(IPv4-mapped IPv6 included), are refused unless an explicit allow-list names their network.
The resolver answers each host once per downloader (one shard) and refuses blocked answers
itself, so the connector can only ever connect to addresses that passed the check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedAddressError(OSError):
    """The host is, or resolves to, an address downloads may not reach."""


class AddressGuard:
    def __init__(self, allow_networks: list[str]) -> None:
        self.allowed = [ipaddress.ip_network(net, strict=False) for net in allow_networks]

    def blocked_reason(self, address: IPAddress) -> str | None:
        """Why `address` is refused, or None when it may be reached."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.allowed):
            return None
        for reason in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
            if getattr(address, f"is_{reason}"):
                return reason.replace("_", "-")
        if not address.is_global:
            return "non-global"
        return None


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
                raise BlockedAddressError(f"{host} resolves to {answer['host']} ({reason})")
        return answers

    async def close(self) -> None:
        await self._inner.close()
