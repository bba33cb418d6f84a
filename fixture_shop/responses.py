"""Answers with validators: ETag, Last-Modified, 304s and gzip.

A page is rendered once into a ``CachedBody`` (its bytes, their ETag, its
Last-Modified and, on first demand, its gzip bytes); every later request for it
costs a dict look-up and a header comparison.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Final

from aiohttp import web

from fixture_shop.pages import render_problem

HTML: Final = "text/html; charset=utf-8"
XML: Final = "application/xml; charset=utf-8"
TEXT: Final = "text/plain; charset=utf-8"
GZIP_FILE: Final = "application/gzip"
JPEG: Final = "image/jpeg"


@dataclass(slots=True)
class CachedBody:
    body: bytes
    content_type: str
    etag: str  # quoted, strong: a hash of ``body`` (the identity encoding)
    last_modified: datetime
    last_modified_header: str
    compressible: bool  # gzip it for a client that accepts gzip
    gzipped: bytes | None = None


def cached_body(body: str | bytes, content_type: str, last_modified: datetime, *,
                compressible: bool = True) -> CachedBody:  # fmt: skip
    data = body.encode() if isinstance(body, str) else body
    etag = f'"{hashlib.blake2b(data, digest_size=12).hexdigest()}"'
    header = format_datetime(last_modified.astimezone(UTC), usegmt=True)
    return CachedBody(data, content_type, etag, last_modified, header, compressible)


def accepts_gzip(request: web.Request) -> bool:
    for token in request.headers.get("Accept-Encoding", "").split(","):
        coding, _, parameters = token.partition(";")
        if coding.strip().lower() == "gzip":
            return parameters.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def _is_not_modified(request: web.Request, cached: CachedBody) -> bool:
    """If-None-Match decides when present; If-Modified-Since only without it."""
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None:
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or cached.etag in tags
    if_modified_since = request.headers.get("If-Modified-Since")
    if if_modified_since is None:
        return False
    try:
        since = parsedate_to_datetime(if_modified_since)
    except (TypeError, ValueError):
        return False
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return cached.last_modified <= since


def respond(request: web.Request, cached: CachedBody) -> web.Response:
    """200 with the body (gzipped if welcome), or 304 when the client's copy is current."""
    headers = {"ETag": cached.etag, "Last-Modified": cached.last_modified_header}
    if cached.compressible:
        headers["Vary"] = "Accept-Encoding"
    if _is_not_modified(request, cached):
        return web.Response(status=304, headers=headers)
    body = cached.body
    if cached.compressible and accepts_gzip(request):
        if cached.gzipped is None:
            cached.gzipped = gzip.compress(cached.body, compresslevel=6, mtime=0)
        body = cached.gzipped
        headers["Content-Encoding"] = "gzip"
    headers["Content-Type"] = cached.content_type
    return web.Response(body=body, headers=headers)


def problem(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A small HTML error page (no validators: only 200s carry them)."""
    all_headers = {"Content-Type": HTML, **(headers or {})}
    return web.Response(status=status, body=render_problem(status, message).encode(),
                        headers=all_headers)  # fmt: skip
