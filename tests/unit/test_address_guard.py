"""The webhook SSRF guard: each refused address class, and names resolved once."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from core.webhooks.address_guard import RefusedAddress, Resolver, destination


def _resolving_to(*addresses: str) -> Resolver:
    async def resolve(host: str, port: int) -> Sequence[str]:
        return list(addresses)

    return resolve


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://172.16.0.9/hook", "private"),
        ("http://192.168.1.1/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://100.64.0.1/hook", "carrier-grade NAT"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://224.0.0.1/hook", "multicast"),
        ("http://[fd00::1]/hook", "private"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://[::ffff:10.0.0.1]/hook", "private"),
        ("ftp://example.com/hook", "only http and https"),
        ("https://user:pw@example.com/hook", "credentials"),
    ],
)
async def test_refused_address_classes(url: str, reason: str) -> None:
    with pytest.raises(RefusedAddress, match=reason):
        await destination(url, resolve=_resolving_to("93.184.215.14"))


async def test_a_public_address_is_delivered_to_the_address_checked() -> None:
    found = await destination("https://hooks.example.com:8443/in?x=1",
                              resolve=_resolving_to("93.184.215.14"))  # fmt: skip
    assert (found.address, found.host, found.port, found.path) == (
        "93.184.215.14", "hooks.example.com", 8443, "/in?x=1")  # fmt: skip


async def test_a_name_with_any_private_address_is_refused() -> None:
    with pytest.raises(RefusedAddress, match=r"10\.0\.0\.7"):
        await destination("https://mixed.example.com/",
                          resolve=_resolving_to("93.184.215.14", "10.0.0.7"))  # fmt: skip


async def test_a_name_resolving_to_loopback_is_refused_unless_allowed() -> None:
    with pytest.raises(RefusedAddress, match="loopback"):
        await destination("http://localhost:9000/hook")  # the machine's real resolver
    allowed = await destination("http://localhost:9000/hook", allow_loopback=True)
    assert allowed.address in ("127.0.0.1", "::1") and allowed.port == 9000
