"""Which addresses a webhook delivery may connect to (the SSRF guard).

A consumer names a URL; atelier's workers sit inside a network with a metadata
service, Postgres and Redis. So a delivery URL must be http(s), its host is
resolved once, *every* address it resolves to must be public (a name that
answers one public and one private address is refused: the connection could
land on either), and the delivery then connects to the checked address, not to
the name again (a second lookup could answer differently: DNS rebinding).
Loopback is allowed only when the deployment says so (development, tests).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses it resolves to (getaddrinfo by default).
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

SCHEMES = {"http": 80, "https": 443}
# Refused beyond what ipaddress calls private/reserved: carrier-grade NAT (RFC 6598)
# is not "private" to ipaddress but is nobody's public endpoint.
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class RefusedAddress(ValueError):
    """The URL may not be delivered to; the message says why (shown to the owner)."""


@dataclass(frozen=True)
class Destination:
    """Where a delivery connects: the checked address, and the name the request
    still sends (Host header, TLS server name)."""

    scheme: str
    host: str
    port: int
    address: str
    path: str


def _refusal(address: Address, *, allow_loopback: bool) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _refusal(address.ipv4_mapped, allow_loopback=allow_loopback)
    if address.is_loopback:
        return None if allow_loopback else "loopback"
    if address.is_link_local:
        return "link-local (cloud metadata lives there)"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "carrier-grade NAT"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if address.is_private or address.is_reserved or not address.is_global:
        return "private or reserved"
    return None


async def _getaddrinfo(host: str, port: int) -> Sequence[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def destination(
    url: str, *, allow_loopback: bool = False, resolve: Resolver = _getaddrinfo
) -> Destination:
    """The checked destination of ``url``; RefusedAddress if any part is not allowed."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise RefusedAddress(f"only http and https URLs are delivered to, not {parts.scheme!r}")
    if parts.username or parts.password:
        raise RefusedAddress("credentials in the URL are not allowed")
    host = parts.hostname
    if not host:
        raise RefusedAddress("the URL has no host")
    port = parts.port or SCHEMES[parts.scheme]
    try:
        found = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            found = [ipaddress.ip_address(a.split("%")[0]) for a in await resolve(host, port)]
        except OSError as exc:
            raise RefusedAddress(f"{host} does not resolve: {exc}") from exc
    if not found:
        raise RefusedAddress(f"{host} resolves to no address")
    for address in found:
        why = _refusal(address, allow_loopback=allow_loopback)
        if why is not None:
            raise RefusedAddress(f"{host} resolves to {address}, a {why} address")
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    return Destination(parts.scheme, host, port, str(found[0]), path)
