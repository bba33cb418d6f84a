"""Signed media URLs: HMAC over path, signed query and expiry; expiries rounded up
to a bucket; byte ranges as a reader asks for them."""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import pytest

from api.routes.outputs import requested_range
from core.blobs.signing import (
    EXPIRY_BUCKET_S,
    InvalidSignature,
    UrlExpired,
    UrlSigner,
    signed_path,
)
from core.blobs.store import ByteRange, RangeNotSatisfiable

SIGNER = UrlSigner(b"k" * 32, "https://api.example", 3600)
PATH = "/v1/outputs/0b6f0a4e-8f4e-4c2b-9d0a-5a1f7c1e2d3b"
NOW = 1_700_000_123.0
Change = Callable[[str, int, str], tuple[str, int, str]]


def _parts(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    rest = [(k, v[0]) for k, v in query.items()]
    return signed_path(parts.path, rest), int(query["expires"][0]), query["signature"][0]


def test_a_signed_url_verifies_until_it_expires() -> None:
    url = SIGNER.url(PATH, now=NOW)
    assert url.startswith(f"https://api.example{PATH}?expires=")
    path, expires, signature = _parts(url)
    assert path == PATH
    SIGNER.verify(path, expires, signature, now=NOW)
    SIGNER.verify(path, expires, signature, now=expires - 1)
    with pytest.raises(UrlExpired):
        SIGNER.verify(path, expires, signature, now=expires)


@pytest.mark.parametrize(
    "change",
    [
        lambda p, e, s: (p + "x", e, s),  # another path
        lambda p, e, s: (p, e + 1, s),  # a later expiry
        lambda p, e, s: (p, e, s[:-1] + ("A" if s[-1] != "A" else "B")),
        lambda p, e, s: (p, e, ""),
        lambda p, e, s: (p, e, "été"),  # non-ASCII is refused, not a TypeError
    ],
)
def test_any_change_breaks_the_signature(change: Change) -> None:
    path, expires, signature = _parts(SIGNER.url(PATH, now=NOW))
    with pytest.raises(InvalidSignature):
        path, expires, signature = change(path, expires, signature)
        SIGNER.verify(path, expires, signature, now=NOW)


def test_another_key_does_not_verify() -> None:
    path, expires, signature = _parts(UrlSigner(b"other", "", 3600).url(PATH, now=NOW))
    with pytest.raises(InvalidSignature):
        SIGNER.verify(path, expires, signature, now=NOW)


def test_the_query_is_signed_in_any_order() -> None:
    url = SIGNER.url("/v1/catalog-images/ab", {"variant": "padded", "a": "1"}, now=NOW)
    path, expires, signature = _parts(url)
    assert path == "/v1/catalog-images/ab?a=1&variant=padded"
    SIGNER.verify(path, expires, signature, now=NOW)
    for other in ("/v1/catalog-images/ab?a=1&variant=original", "/v1/catalog-images/ab"):
        with pytest.raises(InvalidSignature):
            SIGNER.verify(other, expires, signature, now=NOW)


def test_expiry_is_rounded_up_so_urls_stay_the_same_within_a_bucket() -> None:
    start = (NOW // EXPIRY_BUCKET_S) * EXPIRY_BUCKET_S
    early, late = (SIGNER.url(PATH, now=start + s) for s in (0.5, EXPIRY_BUCKET_S - 0.5))
    assert early == late
    assert SIGNER.url(PATH, now=start + EXPIRY_BUCKET_S + 0.5) != early
    expires = _parts(early)[1]
    assert expires % EXPIRY_BUCKET_S == 0
    assert start + 0.5 + 3600 <= expires < start + 0.5 + 3600 + EXPIRY_BUCKET_S


def test_the_key_is_not_in_the_repr() -> None:
    assert "kkkk" not in repr(SIGNER) and "kkkk" not in str(SIGNER)


def test_default_clock_is_now() -> None:
    SIGNER.verify(*_parts(SIGNER.url(PATH)), now=time.time())


@pytest.mark.parametrize(
    ("header", "if_range", "expected"),
    [
        ("bytes=0-99", None, ByteRange(first=0, last=99)),
        ("bytes=5-", None, ByteRange(first=5)),
        ("bytes=-20", None, ByteRange(suffix=20)),
        (" Bytes=3-3 ", '"v1"', ByteRange(first=3, last=3, if_etag='"v1"')),
        (None, None, None),
        ("bytes=0-1,4-5", None, None),  # several ranges: the whole body
        ("bytes=9-3", None, None),
        ("bytes=-", None, None),
        ("pages=1-2", None, None),
        ("bytes=0-9", "Wed, 21 Oct 2015 07:28:00 GMT", None),  # If-Range by date
    ],
)
def test_range_headers(
    header: str | None, if_range: str | None, expected: ByteRange | None
) -> None:
    assert requested_range(header, if_range) == expected


@pytest.mark.parametrize(
    ("byte_range", "span"),
    [
        (ByteRange(first=0, last=9), (0, 10)),
        (ByteRange(first=95, last=200), (95, 100)),
        (ByteRange(first=40), (40, 100)),
        (ByteRange(suffix=30), (70, 100)),
        (ByteRange(suffix=300), (0, 100)),
    ],
)
def test_ranges_resolve_against_the_size(byte_range: ByteRange, span: tuple[int, int]) -> None:
    assert byte_range.resolve(100) == span


@pytest.mark.parametrize(
    "byte_range", [ByteRange(first=100), ByteRange(first=150, last=160), ByteRange(suffix=0)]
)
def test_unsatisfiable_ranges(byte_range: ByteRange) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        byte_range.resolve(100)
    assert info.value.size == 100
